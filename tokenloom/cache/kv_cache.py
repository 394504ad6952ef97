"""The paged KV cache (L1t): one pool of blocks per layer, written only through a slot mapping."""

from __future__ import annotations

import torch


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed pool tensor. On the CPU its memory comes from calloc (through numpy), whose pages the
    OS zeroes when they are first touched: a 1 GiB pool costs nothing at load (torch.zeros writes it
    all, about 0.25 s here) and resident memory grows with the blocks actually used."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import numpy as np

    element = torch.empty((), dtype=dtype).element_size()
    count = 1
    for size in shape:
        count *= size
    raw = np.zeros(count * element + 64, dtype=np.uint8)
    start = -raw.ctypes.data % 64  # 64-byte aligned, as torch's own allocator gives
    return torch.from_numpy(raw[start : start + count * element]).view(dtype).view(shape)


class KVCache:
    """Per layer, keys and values of shape [num_blocks, block_size, num_kv_heads, head_dim].

    Token slot `s` lives at block `s // block_size`, offset `s % block_size`. The model writes new
    keys/values with `write` and reads them with `gather` (by slot) or `gather_blocks` (whole
    blocks); nothing else touches the pool. One block past `num_blocks` belongs to no sequence: its
    first slot (`scratch_slot`) is where padding rows of a fixed-size decode batch write.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scratch_slot = num_blocks * block_size
        shape = ((num_blocks + 1) * block_size, num_kv_heads, head_dim)
        self.keys = [_zeros(shape, dtype, device) for _ in range(num_layers)]
        self.values = [_zeros(shape, dtype, device) for _ in range(num_layers)]

    @property
    def nbytes(self) -> int:
        """Bytes held by the pool, keys and values of every layer."""
        return sum(t.nbytes for t in (*self.keys, *self.values))

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * element

    def write(self, layer: int, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        # key/value: [num_tokens, num_kv_heads, head_dim]; slot_mapping: [num_tokens]
        self.keys[layer].index_copy_(0, slot_mapping, key)
        self.values[layer].index_copy_(0, slot_mapping, value)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # slots: [batch, max_context] -> keys, values: [batch, max_context, num_kv_heads, head_dim]
        return self.keys[layer][slots], self.values[layer][slots]

    def gather_blocks(self, layer: int, block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # block_table: [batch, num_blocks] (entries >= 0) -> keys, values:
        # [batch, num_blocks * block_size, num_kv_heads, head_dim]; one contiguous block copied at a time
        batch, width = block_table.shape
        flat = block_table.reshape(-1)
        shape = (batch, width * self.block_size, self.num_kv_heads, self.head_dim)
        blocks = (-1, self.block_size, self.num_kv_heads, self.head_dim)
        keys = self.keys[layer].view(blocks).index_select(0, flat).view(shape)
        values = self.values[layer].view(blocks).index_select(0, flat).view(shape)
        return keys, values

    def copy_blocks(self, src_ids: list[int], dst_ids: list[int]) -> None:
        """Copy whole blocks, keys and values of every layer, from src_ids[i] to dst_ids[i]: the data
        half of copy-on-write (the block manager decides which blocks, this moves the bytes)."""
        if len(src_ids) != len(dst_ids):
            raise ValueError(f"copy_blocks needs as many sources as destinations, got {len(src_ids)} and {len(dst_ids)}")
        if not src_ids:
            return
        device = self.keys[0].device
        offsets = torch.arange(self.block_size, dtype=torch.long, device=device)
        src = (torch.tensor(src_ids, dtype=torch.long, device=device)[:, None] * self.block_size + offsets).reshape(-1)
        dst = (torch.tensor(dst_ids, dtype=torch.long, device=device)[:, None] * self.block_size + offsets).reshape(-1)
        for pool in (*self.keys, *self.values):
            pool.index_copy_(0, dst, pool.index_select(0, src))  # [num_blocks * block_size, heads, dim]
