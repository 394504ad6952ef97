"""The automatic prefix cache's index (L1: pure Python): full KV blocks keyed by a chained hash.

A full block's key hashes its parent's key and its own token ids, so equal keys mean an equal whole
prefix. The chain starts from a root key that hashes the cache's namespace (the model, its weights'
mode, anything else that changes what a block holds), so blocks of different models or modes never
match. Keys are 128-bit BLAKE2b digests: a false match is far less likely than a memory fault.

A block whose last table lets go keeps its contents and its key, and waits in LRU order among the
free blocks; the pool takes the oldest of them only when no plain free block is left.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass


def root_key(namespace: str) -> bytes:
    """The key a sequence's first block chains from."""
    return hashlib.blake2b(namespace.encode("utf-8"), digest_size=16, person=b"tokenloom-root").digest()


def block_key(parent: bytes, token_ids: Seq[int]) -> bytes:
    """The key of a full block holding `token_ids`, after the block whose key is `parent`."""
    h = hashlib.blake2b(parent, digest_size=16, person=b"tokenloom-block")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclass
class PrefixCacheStats:
    """Counts since the engine started: tokens looked up at admission, tokens found, blocks evicted."""

    queries: int = 0
    hits: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class PrefixIndex:
    """Which block holds which key, and the free blocks that still hold a key (in LRU order)."""

    def __init__(self, num_blocks: int) -> None:
        self._key_of: list[bytes | None] = [None] * num_blocks
        self._block_of: dict[bytes, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # free blocks with a key, oldest first
        self.stats = PrefixCacheStats()

    def __len__(self) -> int:
        """Blocks holding a key (in use or idle)."""
        return len(self._block_of)

    @property
    def num_idle(self) -> int:
        return len(self._idle)

    def lookup(self, key: bytes) -> int | None:
        return self._block_of.get(key)

    def key_of(self, block_id: int) -> bytes | None:
        return self._key_of[block_id]

    def is_idle(self, block_id: int) -> bool:
        return block_id in self._idle

    def register(self, block_id: int, key: bytes) -> bool:
        """Record that `block_id` (in use, full, never written again) holds `key`. A key already held by
        another block keeps that block (two requests computed the same prefix at once)."""
        if self._key_of[block_id] is not None or key in self._block_of:
            return False
        self._key_of[block_id] = key
        self._block_of[key] = block_id
        return True

    def forget(self, block_id: int) -> None:
        key = self._key_of[block_id]
        if key is not None:
            self._key_of[block_id] = None
            del self._block_of[key]
        self._idle.pop(block_id, None)

    def park(self, block_id: int) -> None:
        """`block_id` (holding a key) has no table left: it becomes the newest idle block."""
        self._idle[block_id] = None

    def unpark(self, block_id: int) -> None:
        """An idle block is taken back into use by a sequence whose prefix matches it."""
        del self._idle[block_id]

    def evict(self) -> int:
        """The oldest idle block, its key forgotten, for reuse."""
        block_id, _ = self._idle.popitem(last=False)
        self.forget(block_id)
        self.stats.evictions += 1
        return block_id
