"""One parse of a GGUF header per load (L3, no torch): the tokenizer and the checkpoint loaders both
ask `parsed_gguf`, which keeps the last files parsed, keyed by path and the file's identity on disk
(inode, size, modification time), so a file replaced in place is parsed again."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from tokenloom.loading.gguf_reader import GGUFFile, read_gguf

_MAX_FILES = 2
_cache: OrderedDict[tuple[str, int, int, int], GGUFFile] = OrderedDict()
_lock = threading.Lock()


def parsed_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """The parsed header and memory map of a GGUF file (see `read_gguf` for the errors)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return read_gguf(path)  # it raises the right error for a missing or unreadable file
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    with _lock:
        cached = _cache.get(key)
        if cached is not None:
            _cache.move_to_end(key)
            return cached
    parsed = read_gguf(path)
    with _lock:
        _cache[key] = parsed
        while len(_cache) > _MAX_FILES:
            _cache.popitem(last=False)
    return parsed


def clear_cache() -> None:
    with _lock:
        _cache.clear()
