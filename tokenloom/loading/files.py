"""Small file readers shared by the loaders (L3, no torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenloom.errors import ModelLoadError


def read_json_object(path: Path, *, missing_ok: bool = False) -> dict[str, Any]:
    """A JSON file holding an object; {} for a missing file when `missing_ok`. Unreadable or
    malformed files raise ModelLoadError naming the file."""
    if missing_ok and not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    except OSError as exc:
        raise ModelLoadError(f"could not read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data
