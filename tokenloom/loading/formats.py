"""Stored checkpoint tensors -> the weight formats of `models/linear.py` (L3).

Which format a weight gets (`WeightPlan`, decided in `tokenloom.device`):

- exact mode (an explicit dtype): dense, dequantized to that dtype;
- `quantize_bits` (load_in_8bit / load_in_4bit): dense weights quantized per tensor, lm_head kept dense;
- `keep_quantized` (dtype="auto"): each GGUF block of a projection by its type: Q4_0 / Q4_1 / Q4_K on the
  int4 kernel as they are, Q5_0 / Q5_1 / Q5_K / Q8_0 as two 4-bit pieces (both exact up to the kernel's
  bfloat16 scales); other quantized types (Q6_K, Q2_K, Q3_K, ...) requantized to 8-bit codes in groups
  of 32 (two pieces, within half a step of range/255 per group); float tensors dense. Row blocks of one fused projection in the same format share one module,
  different formats make a ConcatLinear. Quantized embeddings stay GGUF blocks. The output projection
  is dense, and on the CPU its stored blocks also go on a kernel for decode steps (`head_kernel_source`,
  used by `ShortlistHead`).

Each quantized tensor is read from its stored blocks straight into its kernel layout; float32 exists
only per tensor (the dense copy for wide calls, when the plan keeps one, and int8 requantization).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from itertools import groupby
from typing import Any

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from tokenloom.device import WeightPlan
from tokenloom.kernels import cpu_decode, int4
from tokenloom.kernels.ggml import AFFINE_GROUP, TORCH_DEQUANTIZERS
from tokenloom.kernels.policy import KernelPolicy
from tokenloom.loading.gguf_quants import GGUFTensor, stored_dense
from tokenloom.models.linear import (
    ConcatLinear,
    Embedding,
    GGUFEmbedding,
    Int4Linear,
    Linear,
    QuantizedLinear,
)
from tokenloom.models.quantization import affine_groups, quantize_weight


def stored_shape(tensor: Any) -> tuple[int, ...]:
    return tuple(tensor.shape)


def to_dense(tensor: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return stored_dense(tensor).to(device=device, dtype=dtype)


def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int]) -> Linear:
    with torch.device("meta"):
        linear = Linear(weight.shape[1], weight.shape[0], bias is not None, sizes)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def materialize_embedding(module: Embedding, tensor: Any, device: torch.device, plan: WeightPlan) -> nn.Module:
    if plan.keep_quantized and isinstance(tensor, GGUFTensor) and tensor.ggml_type in TORCH_DEQUANTIZERS:
        return GGUFEmbedding(tensor.rows.to(device), tensor.ggml_type, module.embedding_dim, plan.dtype)
    with torch.device("meta"):
        embedding = Embedding(module.num_embeddings, module.embedding_dim)
    embedding.weight = nn.Parameter(to_dense(tensor, device, plan.dtype), requires_grad=False)
    return embedding


def _kind(tensor: Any) -> tuple[str, int]:
    """How a stored block runs when kept quantized: ("int4", pieces) as stored, ("int8", 2) requantized
    to 8 bits in groups, or ("dense", 0)."""
    if not isinstance(tensor, GGUFTensor):
        return ("dense", 0)
    if tensor.is_affine and tensor.shape[1] % AFFINE_GROUP == 0:
        return ("int4", -(-tensor.affine_bits // 4))
    return ("int8", 2)


def _blocks(parts: dict[int | None, Any], sizes: list[int]) -> tuple[list[Any], list[int]]:
    """Stored row blocks in order with their sizes: the whole weight, or one tensor per block."""
    if None in parts:
        return [parts[None]], [sum(sizes)]
    return [parts[i] for i in range(len(sizes))], sizes


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def materialize_linear(
    module: Linear,
    weights: dict[int | None, Any],
    biases: dict[int | None, Any],
    device: torch.device,
    plan: WeightPlan,
    quantize_bits: int | None,
) -> nn.Module:
    """The module for one (possibly fused) projection from its stored row blocks."""
    sizes = list(module.output_sizes)
    blocks, block_sizes = _blocks(weights, sizes)
    bias_blocks = [to_dense(b, device, plan.dtype) for b in _blocks(biases, sizes)[0]] if biases else None
    if quantize_bits is not None:
        weight = _cat([stored_dense(b).float() for b in blocks])
        bias = _cat(bias_blocks) if bias_blocks else None
        return quantize_weight(weight, quantize_bits, device, bias=bias, output_sizes=sizes, policy=plan.kernels)
    if not plan.keep_quantized or not any(isinstance(b, GGUFTensor) for b in blocks):
        weight = _cat([to_dense(b, device, plan.dtype) for b in blocks])
        return _dense_linear(weight, _cat(bias_blocks) if bias_blocks else None, sizes)

    parts: list[nn.Module] = []
    bias_rows = _cat(bias_blocks) if bias_blocks else None
    start = 0
    runs = [list(run) for _, run in groupby(range(len(blocks)), key=lambda i: _kind(blocks[i]))]
    for run in runs:
        rows = sum(block_sizes[i] for i in run)
        bias = bias_rows[start : start + rows] if bias_rows is not None else None
        part_sizes = sizes if len(runs) == 1 else [block_sizes[i] for i in run]
        parts.append(_quantized_part(_kind(blocks[run[0]]), [blocks[i] for i in run], part_sizes, bias, device, plan))
        start += rows
    return parts[0] if len(parts) == 1 else ConcatLinear(parts, sizes)


def _affine_dense(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """code * scale + offset per group of 32, in float32: the same operations as the dequantizers, so
    the same values as `gguf.quants`."""
    rows, cols = codes.shape
    grouped = codes.view(rows, cols // AFFINE_GROUP, AFFINE_GROUP).float()
    return (grouped * scales[..., None] + offsets[..., None]).view(rows, cols)


_NATIVE_DEQUANTIZED = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0)


def _dense_values(block: GGUFTensor) -> torch.Tensor:
    """float32 values of stored blocks (the dense copy for wide calls): the dequantizer for the types
    it runs in one C pass, else code * scale + offset from the affine codes (the same values)."""
    if block.ggml_type in _NATIVE_DEQUANTIZED:
        return block.dequantize()
    return _affine_dense(*block.affine()[:3])


def _native_pack(
    blocks: list[GGUFTensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int4.Int4Layout] | None:
    """Q4_0 / Q4_1 row blocks straight into the CPU int4 kernel's layout in one C pass (the torch
    route unpacks every code to a byte, then packs them again), or None where that does not apply:
    another type or a mix, not the CPU, shapes the kernel pads, no C compiler."""
    kind = blocks[0].ggml_type
    if kind not in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1) or device.type != "cpu":
        return None
    if any(b.ggml_type != kind for b in blocks):
        return None
    rows = sum(b.shape[0] for b in blocks)
    cols = blocks[0].shape[1]
    if rows % 16 or cols % AFFINE_GROUP or int4._cpu_block_rows() != 64:
        return None
    ops = cpu_decode.ops()
    if ops is None:
        return None
    raw = torch.cat([b.rows for b in blocks]) if len(blocks) > 1 else blocks[0].rows.contiguous()
    block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)][1]
    if raw.dtype != torch.uint8 or raw.numel() != rows * (cols // AFFINE_GROUP) * block_bytes:
        return None  # not the bytes these shapes need: the torch route names the problem
    packed = torch.empty(rows, cols // 2, dtype=torch.uint8)
    scale_and_zeros = torch.empty(cols // AFFINE_GROUP, rows, 2, dtype=torch.bfloat16)
    has_min = int(kind == GGMLQuantizationType.Q4_1)
    if ops.pack_q4(raw.data_ptr(), has_min, rows, cols, packed.data_ptr(), scale_and_zeros.data_ptr()) != 0:
        return None
    return packed, scale_and_zeros, int4.Int4Layout(rows, cols, AFFINE_GROUP)


def _quantized_part(
    kind: tuple[str, int],
    blocks: list[Any],
    sizes: list[int],
    bias: torch.Tensor | None,
    device: torch.device,
    plan: WeightPlan,
) -> nn.Module:
    dense_dtype = plan.kernels.dense_dtype
    options: dict[str, Any] = {"output_sizes": sizes, "bias": bias, "policy": plan.kernels}
    if kind[0] == "dense":
        return _dense_linear(_cat([to_dense(b, device, plan.dtype) for b in blocks]), bias, sizes)
    if kind[0] == "int8":  # requantized: 8-bit codes in groups of 32
        dequantized = _cat([b.dequantize() for b in blocks])
        if dense_dtype is not None:  # built on the first wide call, from the mapped blocks
            options["dense"] = lambda: _cat([b.dequantize() for b in blocks])
        codes, scales, offsets = affine_groups(dequantized, 8, AFFINE_GROUP)
        return Int4Linear.from_affine(codes, scales, offsets, 8, AFFINE_GROUP, device, **options)
    if dense_dtype is not None:  # built on the first wide call, from the mapped blocks
        options["dense"] = lambda: _cat([_dense_values(b) for b in blocks])
    native = _native_pack(blocks, device)
    if native is not None:
        return Int4Linear(*native, in_features=blocks[0].shape[1], pieces=1, **options)
    affine = [b.affine() for b in blocks]
    codes, scales, offsets = (_cat([a[i] for a in affine]) for i in range(3))
    bits = max(a[3] for a in affine)
    return Int4Linear.from_affine(codes, scales, offsets, bits, AFFINE_GROUP, device, **options)


def head_kernel_source(tensor: Any, device: torch.device, plan: WeightPlan) -> Callable[[torch.device], QuantizedLinear] | None:
    """For the default mode's output projection on the CPU: a builder of its stored GGUF blocks as a
    quantized kernel with no dense copy (what `_quantized_part` makes of them), or None where the head
    is dense in the checkpoint or the plan keeps nothing quantized. Nothing is read until it is called."""
    if not plan.keep_quantized or device.type != "cpu" or not isinstance(tensor, GGUFTensor):
        return None
    kind = _kind(tensor)
    if kind[0] == "dense":
        return None
    kernel_plan = replace(plan, kernels=KernelPolicy(plan.kernels.max_kernel_rows, dense_dtype=None))
    sizes = [tensor.shape[0]]

    def build(where: torch.device) -> QuantizedLinear:
        part = _quantized_part(kind, [tensor], sizes, None, where, kernel_plan)
        assert isinstance(part, QuantizedLinear)
        return part

    return build
