"""On-disk cache of the BPE vocabulary and merges derived from a GGUF file's tokenizer metadata (L3, no
torch), under `$TOKENLOOM_HOME/tokenizers/`.

Deriving them is the slow part of a tokenizer rebuild: Gemma 3's merges are regenerated from its
262k-token vocabulary (seconds), SmolLM2's 49k tokens and merges are decoded and split. An entry holds
exactly what the builder hands to `tokenizers.models.BPE`, so a cached load runs the same assembly as a
first one (pre-tokenizer, added and special tokens, post-processor, all from the file's metadata) and
builds the same tokenizer. (A whole `Tokenizer.to_str()` would be no faster: `Tokenizer.from_str`
takes longer than SmolLM2's whole rebuild.)

An entry is keyed by the file (resolved path, device, inode, size, modification time), the entry format,
the source of the code that derives the entry, and the versions of tokenizers and Python (marshal's
format). Only a file whose tokenizer was built without error is stored, so the metadata checks a hostile
file fails keep failing. Entries are written to a temporary file and renamed into place, carry a SHA-256
of their contents, and any entry that cannot be read, fails the checksum or does not decode is ignored
(and rewritten). An unwritable cache directory only means nothing is cached. At most `MAX_ENTRIES` are
kept (least recently used go first).

Beside each tokenizer, the layout of the file's vocabulary arrays (the byte length of every element,
`GGUFFile.layout`) lets the next header parse skip walking 10^5 length fields one by one: the reader
checks every field against it at once and walks them when it does not fit, so it never changes a parse.
"""

from __future__ import annotations

import hashlib
import logging
import marshal
import os
import sys
import tempfile
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MIN_CACHED_TOKENS = 4096  # smaller vocabularies are rebuilt (and their headers walked) in milliseconds
MAX_ENTRIES = 8  # of each kind
_MAGIC = b"tokenloom-bpe\n"
_DIGEST = 32  # bytes of SHA-256
_BPE, _LAYOUT = ".bpe", ".layout"
# The modules whose code decides what an entry holds: a change to any of them is a different key.
_SOURCES = ("gguf_vocab.py", "gguf_tokenizer.py", "gguf_arrays.py", "gguf_reader.py", "tokenizer_cache.py")
_LAYOUT_SOURCES = ("gguf_arrays.py", "gguf_reader.py")

Vocab = dict[str, int]
Merges = list[tuple[str, str]]


@dataclass(frozen=True)
class CacheEntry:
    path: Path  # the entry's file
    key: str  # hex digest of everything the entry depends on


def cache_dir() -> Path:
    """`$TOKENLOOM_HOME/tokenizers` (`~/.cache/tokenloom/tokenizers` by default)."""
    from tokenloom.loading.pull import tokenloom_home

    return tokenloom_home() / "tokenizers"


@cache
def _sources_digest(names: tuple[str, ...]) -> str:
    import tokenloom

    digest = hashlib.sha256(f"{FORMAT_VERSION}|{tokenloom.__version__}|{sys.version}|".encode())
    here = Path(__file__).parent
    for name in names:
        try:
            digest.update((here / name).read_bytes())
        except OSError:  # no sources (a frozen install): the version strings above decide alone
            digest.update(name.encode())
    return digest.hexdigest()


@lru_cache(maxsize=1)
def code_version() -> str:
    """A digest of the tokenloom version, the deriving code's source and the library versions."""
    import tokenizers

    return f"{_sources_digest(_SOURCES)}|{tokenizers.__version__}"


def _entry(gguf_path: Path, suffix: str, version: str) -> CacheEntry | None:
    """The entry of one kind (`suffix`) for a file, keyed by its identity on disk and `version`."""
    try:
        resolved = Path(gguf_path).resolve()
        stat = resolved.stat()
    except OSError:
        return None
    identity = f"{resolved}|{stat.st_dev}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{suffix}|{version}"
    key = hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()
    return CacheEntry(cache_dir() / f"{key[:32]}{suffix}", key)


def entry_for(gguf_path: Path, builder: str, vocab_size: int) -> CacheEntry | None:
    """The entry for a GGUF file's tokenizer, or None when it is not worth caching or the file is gone."""
    if vocab_size < MIN_CACHED_TOKENS:
        return None
    return _entry(gguf_path, _BPE, f"{builder}|{code_version()}")


def layout_entry(gguf_path: Path) -> CacheEntry | None:
    """The entry for the layout of a GGUF file's vocabulary arrays (see `GGUFFile.layout`)."""
    return _entry(gguf_path, _LAYOUT, _sources_digest(_LAYOUT_SOURCES))


def _read(entry: CacheEntry) -> tuple[Any, ...] | None:
    """The values stored in an entry, or None when there is no sound one."""
    try:
        blob = entry.path.read_bytes()
    except OSError:
        return None
    header = len(_MAGIC) + _DIGEST
    payload = memoryview(blob)[header:]
    if blob[: len(_MAGIC)] != _MAGIC or hashlib.sha256(payload).digest() != blob[len(_MAGIC) : header]:
        logger.debug("%s: not a sound tokenizer cache entry; rebuilding it", entry.path)
        return None
    try:
        value: Any = marshal.loads(payload)
    except (EOFError, ValueError, TypeError):
        return None
    if not (isinstance(value, tuple) and len(value) >= 2 and value[0] == FORMAT_VERSION and value[1] == entry.key):
        return None
    try:
        os.utime(entry.path)  # recently used: pruned last
    except OSError:
        pass
    return value[2:]


def _write(entry: CacheEntry, values: tuple[Any, ...]) -> None:
    """Write an entry atomically; any OS error (a read-only or full disk) just leaves it unwritten."""
    payload = marshal.dumps((FORMAT_VERSION, entry.key, *values))
    directory = entry.path.parent
    temporary: str | None = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{entry.path.name}.", suffix=".tmp", dir=directory)
        with os.fdopen(handle, "wb") as out:
            out.write(_MAGIC)
            out.write(hashlib.sha256(payload).digest())
            out.write(payload)
        os.replace(temporary, entry.path)
        temporary = None
    except OSError as exc:
        logger.debug("cannot write the tokenizer cache entry %s: %s", entry.path, exc)
        return
    finally:
        if temporary is not None:
            try:
                os.unlink(temporary)
            except OSError:
                pass
    _prune(directory, entry.path.suffix)


def load(entry: CacheEntry) -> tuple[Vocab, Merges] | None:
    """The cached vocabulary and merges, or None when there is no sound entry."""
    values = _read(entry)
    if values is None or len(values) != 2 or not isinstance(values[0], dict) or not isinstance(values[1], list):
        return None
    return values[0], values[1]


def store(entry: CacheEntry, vocab: Vocab, merges: Merges) -> None:
    """Keep a tokenizer's vocabulary and merges (see `_write`)."""
    # Merges spelled with the vocabulary's own string objects let marshal write each string once, and a
    # load then builds half as many objects. The file's merges come that way (`parsed_merges`); rebuilt
    # ones are respelled here. (Only the size and speed depend on it: equal strings load equal.)
    canonical = dict(zip(vocab, vocab)).get
    if any(canonical(left) is not left or canonical(right) is not right for left, right in merges[:64]):
        lefts, rights = zip(*merges)
        merges = list(zip(map(canonical, lefts, lefts), map(canonical, rights, rights)))
    _write(entry, (vocab, merges))


def load_layout(entry: CacheEntry) -> dict[str, np.ndarray] | None:
    """A cached vocabulary layout (hints the reader checks against the file), or None."""
    values = _read(entry)
    if values is None or len(values) != 1 or not isinstance(values[0], dict):
        return None
    try:
        return {str(key): np.frombuffer(lengths, dtype="<u8") for key, lengths in values[0].items()}
    except (TypeError, ValueError):
        return None


def store_layout(entry: CacheEntry, layout: dict[str, np.ndarray]) -> None:
    """Keep a vocabulary layout when its arrays are large enough to be worth it (see `_write`)."""
    if sum(len(lengths) for lengths in layout.values()) >= MIN_CACHED_TOKENS:
        _write(entry, ({key: lengths.astype("<u8").tobytes() for key, lengths in layout.items()},))


def _prune(directory: Path, suffix: str) -> None:
    """Keep the MAX_ENTRIES most recently used entries of one kind."""
    entries = []
    try:
        for path in directory.glob(f"*{suffix}"):
            try:
                entries.append((path.stat().st_mtime_ns, path))
            except OSError:  # removed meanwhile
                pass
    except OSError:
        return
    entries.sort(reverse=True)
    for _, path in entries[MAX_ENTRIES:]:
        try:
            path.unlink()
        except OSError:
            pass


def clear() -> None:
    """Remove every entry (and leftover temporary file) of the cache directory."""
    directory = cache_dir()
    for pattern in (f"*{_BPE}", f"*{_LAYOUT}", ".*.tmp"):
        for path in directory.glob(pattern):
            try:
                path.unlink()
            except OSError:
                pass
