"""Hands out KV-cache blocks as tokens arrive (L1: pure Python)."""

from __future__ import annotations

from collections import deque

from tokenloom.engine.sequence import FREED_BLOCK, Sequence


class BlockManager:
    """A free list of fixed-size blocks. A sequence owns `ceil(tokens / block_size)` blocks.

    Reference counts are kept so that sequences sharing a prefix can later share blocks.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        need = -(-total // self.block_size)
        return max(0, need - len(seq.block_ids))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give `seq` enough blocks to hold its computed tokens plus `num_new_tokens`."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {need}, have {len(self._free)}")
        for _ in range(need):
            block_id = self._free.popleft()
            self._ref_counts[block_id] = 1
            seq.block_ids.append(block_id)

    def free(self, seq: Sequence) -> None:
        """Release every block of `seq` (blocks still shared elsewhere stay allocated)."""
        for block_id in reversed(seq.block_ids):
            if block_id == FREED_BLOCK:
                continue
            self._release_block(block_id)
        seq.block_ids = []
        seq.num_freed_blocks = 0

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
                self._release_block(block_id)
                seq.block_ids[index] = FREED_BLOCK
                released += 1
        seq.num_freed_blocks = max(seq.num_freed_blocks, last)
        return released

    @staticmethod
    def num_held_blocks(seq: Sequence) -> int:
        """Blocks `seq` holds in the pool (its table minus the entries freed behind its window)."""
        return sum(1 for block_id in seq.block_ids if block_id != FREED_BLOCK)

    def _release_block(self, block_id: int) -> None:
        self._ref_counts[block_id] -= 1
        if self._ref_counts[block_id] == 0:
            self._free.append(block_id)

    # ---- sharing: fork and copy-on-write (beam search) ------------------------------------
    def ref_count(self, block_id: int) -> int:
        """How many block tables hold `block_id` (0: it is in the free pool)."""
        return self._ref_counts[block_id]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let `child` share every block of `parent` (its whole prefix); nothing is copied until a
        write lands in a shared block, see `copy_on_write`. `child` must hold no blocks yet."""
        if child.block_ids:
            raise ValueError(f"fork: sequence {child.request_id!r} already holds blocks")
        for block_id in parent.block_ids:
            if block_id != FREED_BLOCK:
                self._ref_counts[block_id] += 1
        child.block_ids = list(parent.block_ids)
        child.num_freed_blocks = parent.num_freed_blocks

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
        if len(indices) > len(self._free):
            raise RuntimeError(f"out of KV blocks: copy-on-write needs {len(indices)}, have {len(self._free)}")
        copies = []
        for index in indices:
            source = seq.block_ids[index]
            target = self._free.popleft()
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
