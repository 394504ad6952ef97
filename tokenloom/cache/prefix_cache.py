"""The automatic prefix cache's index (L1: pure Python): full KV blocks keyed by a chained hash.

A full block's key hashes its parent's key and its own token ids, so equal keys mean an equal whole
prefix. The chain starts from a root key that hashes the cache's namespace (the model, its weights'
mode, anything else that changes what a block holds), so blocks of different models or modes never
match. Keys are 128-bit BLAKE2b digests: a false match is far less likely than a memory fault.

A block whose last table lets go keeps its contents and its key, and waits in LRU order among the
free blocks; the pool takes the oldest of them only when no plain free block is left.

A sequence's last, partly filled block is kept too when its last table lets go (a tail): it has no
key of its own, but is filed under its parent's key with the tokens it holds, so a later prompt that
continues the same prefix (the next turn of a chat: the answer's last tokens, then the new message)
takes it over and computes only from where it ends. A tail is taken whole by one sequence, which
then writes its next tokens into it: it is never shared, and leaves the index when taken.
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
        self._idle: OrderedDict[int, None] = OrderedDict()  # free blocks with a key or a tail, oldest first
        self._tails: dict[bytes, dict[int, tuple[int, ...]]] = {}  # parent key -> {tail block: its tokens}
        self._tail_parent: dict[int, bytes] = {}  # tail block -> its parent key
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

    def is_tail(self, block_id: int) -> bool:
        return block_id in self._tail_parent

    def park_tail(self, block_id: int, parent: bytes, token_ids: Seq[int]) -> None:
        """`block_id` (no key, no table left) holds the KV of `token_ids` (fewer than a block) right after
        the block keyed `parent` (or the root): it becomes the newest idle block, filed as a tail."""
        self._tails.setdefault(parent, {})[block_id] = tuple(token_ids)
        self._tail_parent[block_id] = parent
        self._idle[block_id] = None

    def take_tail(self, parent: bytes, token_ids: Seq[int]) -> tuple[int, int] | None:
        """The tail after `parent` holding the longest start of `token_ids`, taken out of the index
        (the caller owns it now): (block id, how many of `token_ids` it holds); None without one."""
        best, best_len = None, 0
        for block_id, held in self._tails.get(parent, {}).items():
            if best_len < len(held) <= len(token_ids) and tuple(token_ids[: len(held)]) == held:
                best, best_len = block_id, len(held)
        if best is None:
            return None
        self._drop_tail(best)
        del self._idle[best]
        return best, best_len

    def _drop_tail(self, block_id: int) -> None:
        parent = self._tail_parent.pop(block_id)
        siblings = self._tails[parent]
        del siblings[block_id]
        if not siblings:
            del self._tails[parent]

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
        if block_id in self._tail_parent:
            self._drop_tail(block_id)
        self._idle.pop(block_id, None)

    def park(self, block_id: int) -> None:
        """`block_id` (holding a key) has no table left: it becomes the newest idle block."""
        self._idle[block_id] = None

    def unpark(self, block_id: int) -> None:
        """An idle block is taken back into use by a sequence whose prefix matches it."""
        del self._idle[block_id]

    def clear(self) -> list[int]:
        """Forget every key and tail; returns the idle blocks, which are plain free blocks now."""
        idle = list(self._idle)
        self._key_of = [None] * len(self._key_of)
        self._block_of.clear()
        self._idle.clear()
        self._tails.clear()
        self._tail_parent.clear()
        return idle

    def evict(self) -> int:
        """The oldest idle block, its key forgotten, for reuse."""
        block_id, _ = self._idle.popitem(last=False)
        self.forget(block_id)
        self.stats.evictions += 1
        return block_id
