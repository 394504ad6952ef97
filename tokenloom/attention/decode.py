"""Attention metadata of a decode-only step (every row one new token) as tensors of fixed shape
(L1t): what the compiled decode captures, and what the eager path uses for such steps too.

Keys are read a whole block at a time through the block table (no per-slot index), and each layer
reads only the blocks its window can reach. Rows may be padding (a batch-size bucket larger than
the step): they write their key/value to the cache's scratch slot and attend that slot alone."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tokenloom.attention.paged import AttentionGroup


@dataclass
class DecodeMetadata:
    """One query per row; every field a tensor whose shape depends only on the batch bucket and the
    block-table width, so a compiled step sees the same graph step after step.

    input_ids / positions / slot_mapping / seq_lens (each row's context length): [rows];
    block_table: [rows, max_blocks], each row padded with block 0 (masked: positions past a row's
    context are never attended) and freed (negative) entries clamped to 0 (masked too: they lie
    behind every window that reads them). query_lens / context_lens: the step's per-row lists, as
    AttentionMetadata has them, for eager code that reads them; None in the compiled step, where a
    list would be a constant of the graph."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    block_size: int
    query_lens: list[int] | None = None
    context_lens: list[int] | None = None
    first_block: int | None = None  # eager, one row whose blocks are consecutive: its first block
    _groups: dict[int | None, list[AttentionGroup]] = field(default_factory=dict, repr=False)

    @staticmethod
    def pack(
        input_ids: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        num_rows: int,
        max_blocks: int,
        scratch_slot: int,
    ) -> np.ndarray:
        """The host side of one step, as one int64 array [num_rows, 4 + max_blocks]: per row its token
        id, position, cache slot, context length and block table; rows past the step are padding
        (token 0 at position 0, writing `scratch_slot`, the first slot of a block no sequence owns,
        and attending that one key)."""
        host = np.zeros((num_rows, 4 + max_blocks), dtype=np.int64)
        n = len(input_ids)
        host[:n, 0] = input_ids
        positions = np.asarray(context_lens, dtype=np.int64) - 1
        host[:n, 1] = positions
        host[:n, 3] = context_lens
        tables = host[:, 4:]
        for row, table in enumerate(block_tables):
            tables[row, : len(table)] = table
        np.maximum(tables, 0, out=tables)
        host[:n, 2] = tables[np.arange(n), positions // block_size] * block_size + positions % block_size
        host[n:, 2] = scratch_slot
        host[n:, 3] = 1
        host[n:, 4] = scratch_slot // block_size
        return host

    @classmethod
    def from_packed(cls, packed: torch.Tensor, block_size: int) -> DecodeMetadata:
        """packed: [rows, 4 + max_blocks] long on the device (see `pack`)."""
        return cls(
            input_ids=packed[:, 0],
            positions=packed[:, 1],
            slot_mapping=packed[:, 2],
            seq_lens=packed[:, 3],
            block_table=packed[:, 4:],
            block_size=block_size,
        )

    @classmethod
    def build(
        cls,
        input_ids: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
        scratch_slot: int,
    ) -> DecodeMetadata:
        """Eager use: rows exactly the step's, one host-to-device copy."""
        max_blocks = max(len(t) for t in block_tables)
        host = cls.pack(input_ids, context_lens, block_tables, block_size, len(input_ids), max_blocks, scratch_slot)
        packed = torch.from_numpy(host)
        if device.type != "cpu":
            packed = packed.pin_memory().to(device, non_blocking=True)
        meta = cls.from_packed(packed, block_size)
        meta.query_lens = [1] * len(input_ids)
        meta.context_lens = list(context_lens)
        if len(block_tables) == 1:
            table = block_tables[0]
            if table[0] >= 0 and table[-1] - table[0] == len(table) - 1 and table == list(range(table[0], table[-1] + 1)):
                meta.first_block = table[0]
        return meta

    def groups_for(self, window: int | None) -> list[AttentionGroup]:
        """One group: every row, its blocks (the last ones its window reaches when `window` is set)."""
        groups = self._groups.get(window)
        if groups is None:
            groups = [self._group(window)]
            if not torch.compiler.is_compiling():
                self._groups[window] = groups  # shared by the step's other layers
        return groups

    def _group(self, window: int | None) -> AttentionGroup:
        if self.first_block is not None and self.context_lens is not None:  # a view of the pool, exact
            end = self.context_lens[0]
            start = max(0, end - window) if window is not None else 0
            base = self.first_block * self.block_size
            index = self.positions.new_zeros(1)
            return AttentionGroup(query_index=index[:, None], token_index=index, context_slots=None, mask=None,
                                  context_range=(base + start, base + end))
        rows, max_blocks = self.block_table.shape
        block_size = self.block_size
        device = self.block_table.device
        ends = self.seq_lens  # [rows]: keys at positions < ends
        tables = self.block_table
        first = torch.zeros_like(ends)  # [rows] first position of the first block read
        if window is not None and -(-window // block_size) + 1 < max_blocks:
            width = -(-window // block_size) + 1  # blocks a window of `window` positions can touch
            first_block = ((ends - window).clamp(min=0) // block_size).clamp(max=max_blocks - width)
            tables = tables.gather(1, first_block[:, None] + torch.arange(width, device=device))
            first = first_block * block_size
        key_pos = first[:, None] + torch.arange(tables.shape[1] * block_size, device=device)  # [rows, keys]
        allowed = key_pos < ends[:, None]
        if window is not None:
            allowed &= key_pos > (ends - 1 - window)[:, None]
        token_index = torch.arange(rows, device=device)
        return AttentionGroup(
            query_index=token_index[:, None],
            token_index=token_index,
            context_slots=None,
            mask=allowed[:, None, None, :],
            context_blocks=tables,
        )

