"""Hands out KV-cache blocks as tokens arrive (L1: pure Python)."""

from __future__ import annotations

from collections import deque

from tokenloom.engine.sequence import Sequence


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
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free.append(block_id)
        seq.block_ids = []
