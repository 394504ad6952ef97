"""Hands out KV-cache blocks as tokens arrive (L1: pure Python)."""

from __future__ import annotations

from collections import deque

from tokenloom.cache.prefix_cache import PrefixCacheStats, PrefixIndex, block_key, root_key
from tokenloom.engine.sequence import FREED_BLOCK, Sequence


class BlockManager:
    """A free list of fixed-size blocks. A sequence owns `ceil(tokens / block_size)` blocks.

    Reference counts let sequences share blocks (beam forks, and the prefix cache). With
    `enable_prefix_caching`, every full computed block is offered to the prefix index (`commit`), a new
    sequence starts from the longest cached prefix of its tokens (`match_prefix`), and a block freed
    with a key keeps its contents until the pool needs it (idle blocks count as free).
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False, cache_namespace: str = ""
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self._index = PrefixIndex(num_blocks)
        self._root = root_key(cache_namespace)

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence can take: the plain free ones and the idle cached ones."""
        return len(self._free) + self._index.num_idle

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a prefix-cache key, in use or idle."""
        return len(self._index)

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return self._index.stats

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        need = -(-total // self.block_size)
        return max(0, need - len(seq.block_ids))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give `seq` enough blocks to hold its computed tokens plus `num_new_tokens`."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: need {need}, have {self.num_free_blocks}")
        for _ in range(need):
            block_id = self._take()
            self._ref_counts[block_id] = 1
            seq.block_ids.append(block_id)

    def _take(self) -> int:
        """A block for new contents: a plain free one, else the oldest idle cached one."""
        return self._free.popleft() if self._free else self._index.evict()

    def free(self, seq: Sequence) -> None:
        """Release every block of `seq` (blocks still shared elsewhere stay allocated). With the prefix
        cache, a partly filled last block that no other table holds is kept as a tail (see
        `PrefixIndex.park_tail`): its tokens up to the computed count are final."""
        tail_block, tail = self._tail_of(seq)
        for block_id in reversed(seq.block_ids):
            if block_id == FREED_BLOCK:
                continue
            self._release_block(block_id, tail=tail if block_id == tail_block else None)
        seq.block_ids = []
        seq.num_freed_blocks = 0
        seq.num_committed_blocks = 0

    def free_blocks_before(self, seq: Sequence, position: int) -> int:
        """Release the blocks of `seq` whose positions all lie before `position` (the oldest
        position any of its future queries can attend under a sliding window). Their table
        entries become FREED_BLOCK, so later blocks keep their position-based index. Returns how
        many blocks were released."""
        last = min(max(0, position) // self.block_size, len(seq.block_ids))  # blocks [0, last) are done
        released = 0
        for index in range(seq.num_freed_blocks, last):
            block_id = seq.block_ids[index]
            if block_id != FREED_BLOCK:
                # behind the window: no later sequence can reuse it, so it is no cache entry
                self._release_block(block_id, keep_key=False)
                seq.block_ids[index] = FREED_BLOCK
                released += 1
        seq.num_freed_blocks = max(seq.num_freed_blocks, last)
        return released

    @staticmethod
    def num_held_blocks(seq: Sequence) -> int:
        """Blocks `seq` holds in the pool (its table minus the entries freed behind its window)."""
        return sum(1 for block_id in seq.block_ids if block_id != FREED_BLOCK)

    def _tail_of(self, seq: Sequence) -> tuple[int, tuple[bytes, list[int]] | None]:
        """The partly filled block `seq` computed last and (parent key, its tokens), when it could be
        kept as a tail; else (-1, None)."""
        full, held = divmod(seq.num_computed_tokens, self.block_size)
        if not self.enable_prefix_caching or not held or len(seq.block_ids) <= full:
            return -1, None
        if seq.block_ids[full] == FREED_BLOCK or seq.num_committed_blocks < full:
            return -1, None  # its parent chain is not all in the index
        parent = seq.block_hashes[full - 1] if full else self._root
        return seq.block_ids[full], (parent, seq.token_ids[full * self.block_size : seq.num_computed_tokens])

    def _release_block(
        self, block_id: int, keep_key: bool = True, tail: tuple[bytes, list[int]] | None = None
    ) -> None:
        self._ref_counts[block_id] -= 1
        if self._ref_counts[block_id] == 0:
            if keep_key and self._index.key_of(block_id) is not None:
                self._index.park(block_id)
            elif tail is not None:  # a partly filled block has no key
                self._index.park_tail(block_id, *tail)
            else:
                self._index.forget(block_id)
                self._free.append(block_id)

    # ---- the prefix cache -----------------------------------------------------------------
    def _keys_upto(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The chained keys of the first `num_blocks` full blocks of `seq`'s tokens (kept on `seq`)."""
        keys, size = seq.block_hashes, self.block_size
        for index in range(len(keys), num_blocks):
            keys.append(block_key(keys[-1] if keys else self._root, seq.token_ids[index * size : (index + 1) * size]))
        return keys

    def match_prefix(self, seq: Sequence) -> int:
        """Give a sequence that holds no blocks the cached blocks of its longest cached prefix (whole
        blocks, then the longest tail that continues them, leaving at least its last token to compute)
        and count them as computed. Returns the number of tokens reused. `free` undoes it."""
        if not self.enable_prefix_caching or seq.block_ids or seq.num_computed_tokens:
            return 0
        keys = self._keys_upto(seq, (seq.num_tokens - 1) // self.block_size)
        index = self._index
        for key in keys:
            block_id = index.lookup(key)
            if block_id is None:
                break
            if index.is_idle(block_id):
                index.unpark(block_id)
            self._ref_counts[block_id] += 1
            seq.block_ids.append(block_id)
        full = len(seq.block_ids)
        seq.num_committed_blocks = full
        seq.num_computed_tokens = full * self.block_size
        start = seq.num_computed_tokens
        rest = seq.token_ids[start : min(start + self.block_size - 1, seq.num_tokens - 1)]
        tail = index.take_tail(keys[full - 1] if full else self._root, rest) if rest else None
        if tail is not None:
            block_id, held = tail
            self._ref_counts[block_id] = 1
            seq.block_ids.append(block_id)
            seq.num_computed_tokens += held
        return seq.num_computed_tokens

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix: the idle cached blocks become plain free blocks, and blocks in use
        lose their keys (requests running on them go on; later ones cannot match them)."""
        self._free.extend(self._index.clear())

    def record_lookup(self, num_tokens: int, num_cached: int) -> None:
        """Count one admitted sequence's lookup: `num_tokens` looked up, `num_cached` found."""
        if self.enable_prefix_caching:
            stats = self._index.stats
            stats.queries += num_tokens
            stats.hits += num_cached

    def commit(self, seq: Sequence) -> None:
        """Offer the full blocks of `seq` that lie wholly below its computed tokens to the cache. Call it
        once the step's tokens and computed count are final (no token is taken back after this)."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_committed_blocks:
            return
        keys = self._keys_upto(seq, num_full)
        for index in range(seq.num_committed_blocks, num_full):
            block_id = seq.block_ids[index]
            if block_id != FREED_BLOCK:
                self._index.register(block_id, keys[index])
        seq.num_committed_blocks = num_full

    def check_consistency(self) -> None:
        """Raise AssertionError when the pool's books disagree (used by tests after random workloads)."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is twice in the free list"
        for block_id in range(self.num_blocks):
            ref = self._ref_counts[block_id]
            assert ref >= 0, f"block {block_id}: negative reference count {ref}"
            idle = self._index.is_idle(block_id)
            keyed = self._index.key_of(block_id) is not None
            tail = self._index.is_tail(block_id)
            assert not (keyed and tail), f"block {block_id} is keyed and a tail"
            if ref > 0:
                assert block_id not in free and not idle and not tail, f"block {block_id} is in use and free"
            else:
                assert (block_id in free) != idle, f"block {block_id}: unused but not free exactly once"
                assert idle == (keyed or tail), f"block {block_id}: idle {idle} but keyed {keyed}, tail {tail}"

    # ---- sharing: fork and copy-on-write (beam search) ------------------------------------
    def ref_count(self, block_id: int) -> int:
        """How many block tables hold `block_id` (0: it is in the free pool)."""
        return self._ref_counts[block_id]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let `child` share every block of `parent` (its whole prefix); nothing is copied until a
        write lands in a shared block, see `copy_on_write`. `child` must hold no blocks yet, and its
        tokens must start with all of `parent`'s (what makes the shared blocks its own)."""
        if child.block_ids:
            raise ValueError(f"fork: sequence {child.request_id!r} already holds blocks")
        for block_id in parent.block_ids:
            if block_id != FREED_BLOCK:
                self._ref_counts[block_id] += 1
        child.block_ids = list(parent.block_ids)
        child.num_freed_blocks = parent.num_freed_blocks
        child.num_committed_blocks = parent.num_committed_blocks
        # the child's tokens start with the parent's, so the parent's block keys are its own too
        child.block_hashes = list(parent.block_hashes)

    def num_shared_blocks_to_write(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks of `seq` that the next `num_new_tokens` writes land in and that another table
        shares: each needs a private copy first."""
        return len(self._shared_write_indices(seq, num_new_tokens))

    def copy_on_write(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Before `num_new_tokens` tokens are written after the computed ones of `seq`: replace each
        shared block they land in with a fresh block of its own. Returns the (source, destination)
        pairs whose contents the caller must copy in the KV cache before the write; the last
        holder of a block writes in place, so a block shared by n tables is copied n - 1 times."""
        indices = self._shared_write_indices(seq, num_new_tokens)
        if len(indices) > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: copy-on-write needs {len(indices)}, have {self.num_free_blocks}")
        copies = []
        for index in indices:
            source = seq.block_ids[index]
            target = self._take()
            self._ref_counts[target] = 1
            self._ref_counts[source] -= 1  # still > 0: another table holds it
            seq.block_ids[index] = target
            copies.append((source, target))
        return copies

    def _shared_write_indices(self, seq: Sequence, num_new_tokens: int) -> list[int]:
        first = seq.num_computed_tokens // self.block_size
        end = min(-(-(seq.num_computed_tokens + num_new_tokens) // self.block_size), len(seq.block_ids))
        return [
            index for index in range(first, end)
            if seq.block_ids[index] != FREED_BLOCK and self._ref_counts[seq.block_ids[index]] > 1
        ]
