"""Small file readers shared by the loaders (L3, no torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenloom.errors import ModelLoadError


def read_json_object(
    path: Path, *, missing_ok: bool = False, error: type[ModelLoadError] = ModelLoadError
) -> dict[str, Any]:
    """A JSON file holding an object; {} for a missing file when `missing_ok`. Unreadable or
    malformed files raise `error` (ModelLoadError) naming the file."""
    if missing_ok and not path.is_file():
        return {}
    return read_json_value(path, error, expect=dict)


def read_json_value(path: Path, error: type[ModelLoadError] = ModelLoadError, *, expect: type | None = None) -> Any:
    """A JSON file's value; a file that cannot be read, is not UTF-8, is not JSON, nests too deeply or
    (with `expect`) holds another type raises `error` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    except RecursionError as exc:
        raise error(f"{path} nests JSON arrays or objects too deeply to read") from exc
    except (OSError, ValueError) as exc:
        raise error(f"could not read {path}: {exc}") from exc
    if expect is not None and not isinstance(data, expect):
        raise error(f"{path} must hold a JSON {'object' if expect is dict else expect.__name__}, "
                    f"found {type(data).__name__}")
    return data


def read_text(path: Path, error: type[ModelLoadError] = ModelLoadError, *, max_chars: int | None = None) -> str:
    """A UTF-8 text file (a chat template); errors name the file."""
    try:
        if max_chars is not None and path.stat().st_size > 4 * max_chars:
            raise error(f"{path} is {path.stat().st_size} bytes, more than a file of its kind can need")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    except OSError as exc:
        raise error(f"could not read {path}: {exc}") from exc
