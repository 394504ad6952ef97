"""Dequantization of GGUF tensor data to float32 torch tensors (L3).

The block formats with a torch version (`tokenloom.kernels.ggml`, bit-identical to `gguf.quants`) run
in chunks of blocks; the other types fall back to `gguf.quants.dequantize` (numpy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from tokenloom.errors import GGUFFormatError
from tokenloom.kernels.ggml import AFFINE_DECODERS, TORCH_DEQUANTIZERS, affine_rows

__all__ = ["TORCH_DEQUANTIZERS", "GGUFTensor", "dequantize", "stored_dense", "supported_types"]

# Blocks per chunk: bounds the temporaries of one step to a few MB so they stay in cache.
_CHUNK_BLOCKS = 1 << 14


def dequantize(raw: torch.Tensor | np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw bytes of one tensor (uint8, as stored) -> float32 tensor of `shape` (torch order)."""
    try:
        qtype = GGMLQuantizationType(ggml_type)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError) as exc:
        raise GGUFFormatError(f"unknown ggml tensor type {ggml_type}") from exc
    if isinstance(raw, np.ndarray):
        raw = torch.from_numpy(raw)
    if raw.dtype != torch.uint8:
        raise TypeError(f"raw tensor data must be uint8 bytes, got {raw.dtype}")
    if raw.numel() % type_size:
        raise GGUFFormatError(f"{qtype.name} data of {raw.numel()} bytes is not a whole number of blocks")
    blocks = raw.reshape(-1, type_size)
    function = TORCH_DEQUANTIZERS.get(qtype)
    if function is None:
        return _dequantize_numpy(blocks, qtype, shape)
    out = torch.empty(blocks.shape[0], block_size, dtype=torch.float32)
    step = _CHUNK_BLOCKS if block_size > 1 else blocks.shape[0]
    for start in range(0, blocks.shape[0], max(step, 1)):
        function(blocks[start : start + step], out[start : start + step])
    return out.reshape(shape)


def _dequantize_numpy(
    blocks: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, ...]
) -> torch.Tensor:
    try:
        values = gguf_quants.dequantize(blocks.numpy(), qtype)
    except NotImplementedError as exc:
        raise GGUFFormatError(f"tensor type {qtype.name} is not supported: {exc}") from exc
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def supported_types() -> list[str]:
    """Names of the ggml types this module can dequantize (torch or numpy fallback)."""
    return sorted(qtype.name for qtype in GGMLQuantizationType if _is_supported(qtype))


def _is_supported(qtype: GGMLQuantizationType) -> bool:
    if qtype in TORCH_DEQUANTIZERS:
        return True
    traits = getattr(gguf_quants, "_type_traits", {})
    return qtype in traits


@dataclass(frozen=True)
class GGUFTensor:
    """A quantized tensor as stored: raw rows uint8 [rows, row_bytes] (a view of the file's map, or a
    row-permuted copy) of one ggml type, standing for float32 `shape` = [rows, row_length]. Loaders
    hand these to the model builder, which repacks them for a kernel or dequantizes them."""

    rows: torch.Tensor
    ggml_type: int
    shape: tuple[int, int]

    @property
    def type_name(self) -> str:
        return GGMLQuantizationType(self.ggml_type).name

    @property
    def is_affine(self) -> bool:
        """Whether its groups of 32 are code * scale + offset (the int4 kernels take it exactly)."""
        return self.ggml_type in AFFINE_DECODERS

    @property
    def affine_bits(self) -> int:
        return AFFINE_DECODERS[self.ggml_type][1]

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.rows.reshape(-1), self.ggml_type, self.shape)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(codes uint8 [rows, row_length], scales, offsets float32 [rows, row_length // 32], bits)."""
        return affine_rows(self.rows, self.ggml_type, self.shape[1])


def stored_dense(tensor: torch.Tensor | GGUFTensor) -> torch.Tensor:
    """A checkpoint tensor as a dense tensor (GGUF blocks dequantized to float32)."""
    return tensor.dequantize() if isinstance(tensor, GGUFTensor) else tensor
