"""What the pull cache holds (`tokenloom list`) and removing a model from it (`tokenloom rm`)."""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from tokenloom.errors import PullError
from tokenloom.loading.pull import PULL_MODELS, _locked, _marked_complete, _models_root
from tokenloom.loading.pull_registry import canonical_name, close_names


@dataclass(frozen=True)
class CachedModel:
    """One directory of `<home>/models`.

    path: the model file (None for a directory no known name owns); size: bytes of every file in
    the directory; is_complete: the model file is there, of the right size, and was verified.
    """

    name: str
    directory: Path
    path: Path | None
    size: int
    is_complete: bool


def _directory_size(directory: Path) -> int:
    total = 0
    for entry in directory.rglob("*"):
        with contextlib.suppress(OSError):
            if entry.is_file() and not entry.is_symlink():
                total += entry.stat().st_size
    return total


def cached_models(home: Path | None = None) -> list[CachedModel]:
    """What the cache holds, sorted by name (read only: nothing is hashed or changed)."""
    root = _models_root(home)
    if not root.is_dir():
        return []
    found = []
    for directory in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        spec = PULL_MODELS.get(directory.name)
        path = directory / spec.filename if spec is not None else None
        complete = spec is not None and path is not None and _marked_complete(spec, path)
        found.append(CachedModel(directory.name, directory, path, _directory_size(directory), complete))
    return found


def remove(name: str, home: Path | None = None) -> Path:
    """Delete a pulled model's directory from the cache; return the directory removed.

    `name` is a pull name (any case, or a matching hub id) or the name of a directory in the cache.
    Raises PullError when there is nothing to remove."""
    root = _models_root(home)
    canonical = canonical_name(name) or (name if name and (root / name).is_dir() and "/" not in name else None)
    if canonical is None:
        close = close_names(name)
        cached = [m.name for m in cached_models(home)]
        raise PullError(
            f"unknown model name {name!r}; cached: {', '.join(cached) if cached else 'nothing'}",
            hint=f"did you mean {close[0]}?" if close else "`tokenloom list` shows what is in the cache",
        )
    directory = root / canonical
    if not directory.is_dir():
        raise PullError(f"{canonical} is not in the cache ({directory})", hint="`tokenloom list` shows what is in the cache")
    with _locked(directory):
        shutil.rmtree(directory)
    return directory
