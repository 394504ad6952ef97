"""File names that model files give (shards in an index, gguf_file=) must stay inside the model
directory (L3, no torch)."""

from __future__ import annotations

import re
from pathlib import Path

from tokenloom.errors import ModelLoadError

_DRIVE = re.compile(r"^[A-Za-z]:")


def contained_path(directory: Path, name: object, what: str) -> Path:
    """`directory / name`, when `name` is a relative path that cannot leave `directory`: a non-empty
    string, no absolute path or drive, no `..` component, no NUL. The check is on the name itself
    (symbolic links inside the directory, such as the Hugging Face cache's, are followed as usual)."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise ModelLoadError(f"{what} must be a file name, got {name!r}")
    parts = re.split(r"[/\\]", name)
    if name.startswith(("/", "\\")) or _DRIVE.match(name) or Path(name).is_absolute():
        raise ModelLoadError(
            f"{what} {name!r} is an absolute path; it must name a file inside {directory}",
            hint="model files may only refer to files in their own directory",
        )
    if ".." in parts or all(part in ("", ".") for part in parts):
        raise ModelLoadError(
            f"{what} {name!r} leaves (or is not a file in) {directory}; it must name a file inside it",
            hint="model files may only refer to files in their own directory",
        )
    return directory / name
