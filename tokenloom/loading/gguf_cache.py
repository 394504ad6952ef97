"""One parse of a GGUF header per load (L3, no torch): the tokenizer and the checkpoint loaders both
ask `parsed_gguf`, which keeps the last files parsed, keyed by path and the file's identity on disk
(inode, size, modification time), so a file replaced in place is parsed again. The layout of its
vocabulary arrays is kept on disk (`tokenizer_cache`), so a later process skips walking them."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from tokenloom.loading import tokenizer_cache
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
    parsed = _read_with_layout(path)
    with _lock:
        _cache[key] = parsed
        while len(_cache) > _MAX_FILES:
            _cache.popitem(last=False)
    return parsed


def _read_with_layout(path: Path) -> GGUFFile:
    """`read_gguf`, given the vocabulary layout of an earlier parse of the same file from the on-disk
    cache (which the reader checks against the file), and keeping the layout it found when that differs."""
    entry = tokenizer_cache.layout_entry(path)
    layout = tokenizer_cache.load_layout(entry) if entry is not None else None
    parsed = read_gguf(path, layout)
    if entry is not None:
        found = parsed.layout()
        if layout is None or found.keys() != layout.keys() or not all(
            np.array_equal(found[key], layout[key]) for key in found
        ):
            tokenizer_cache.store_layout(entry, found)
    return parsed


def clear_cache() -> None:
    with _lock:
        _cache.clear()
