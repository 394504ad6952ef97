"""Where tokenloom keeps its caches on disk (L0): models, derived tokenizers, compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path


def tokenloom_home() -> Path:
    """The cache root: `$TOKENLOOM_HOME`, or `~/.cache/tokenloom`."""
    env = os.environ.get("TOKENLOOM_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "tokenloom"
