"""Weight formats and their kernels (models/linear.py, kernels/): GGUF blocks repacked for the int4
kernel dequantize (through the kernel, identity input) to what `gguf.quants` gives, within the
kernel's bfloat16 scale precision; other types requantized to 8 bits in groups within half a step;
the load_in_8bit / load_in_4bit quantizers' rounding bounds; the row dispatch between kernel and
dense copy. `gguf.quants` (llama.cpp's reference) is the oracle."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from tokenloom.device import WeightPlan
from tokenloom.kernels.ggml import affine_rows
from tokenloom.kernels.policy import KernelPolicy
from tokenloom.loading.formats import materialize_linear
from tokenloom.loading.gguf_quants import GGUFTensor
from tokenloom.loading.gguf_reader import read_gguf
from tokenloom.models.linear import Int4Linear, Int8Linear, Linear
from tokenloom.models.quantization import affine_groups, int8_rows, quantize_weight

CPU = torch.device("cpu")
U = 2.0**-8  # bfloat16's unit roundoff (8 significant bits)
F32_EPS = torch.finfo(torch.float32).eps
# byte offsets of the float16 scales in each block, made finite in random blocks
F16_FIELDS = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q2_K: [80, 82],
              Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}  # fmt: skip
INT4_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_0, Q.Q5_1, Q.Q5_K, Q.Q8_0]
INT8_TYPES = [Q.Q6_K, Q.Q3_K, Q.Q2_K]


def _random_rows(qtype: Q, rows: int, row_length: int, seed: int) -> torch.Tensor:
    """Random blocks (every bit of every field exercised), scales small and finite."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * row_length // block_size, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        scales = (rng.standard_normal(blocks.shape[0]) * 0.05).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(blocks.reshape(rows, -1))


def _reference(rows: torch.Tensor, qtype: Q) -> torch.Tensor:
    values = gguf.quants.dequantize(rows.numpy(), qtype)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(rows.shape[0], -1)


def _through_kernel(linear: torch.nn.Module, in_features: int) -> torch.Tensor:
    """The weight [out, in] as the kernel applies it: the layer's output for the identity input."""
    return linear(torch.eye(in_features)).t()


def _int4_bound(rows: torch.Tensor, qtype: Q, weight: torch.Tensor) -> torch.Tensor:
    """What bfloat16 scales and zeros (rounded by at most U of themselves) and a bfloat16 output can
    change per weight: piece p's codes are at most 8 away from the kernel's 8, its scale is 16**p
    times the group's, and the zero holds the offset plus at most 136 scales (two pieces) or 8 (one)."""
    _, scales, offsets, bits = affine_rows(rows, qtype, weight.shape[1])
    scale_terms = 16.0 if bits <= 4 else 272.0  # 8 + 8 (one piece); 8 + 128 + 136 (two)
    group = (scale_terms * scales.abs() + offsets.abs()).repeat_interleave(32, dim=1)
    return U * (group + weight.abs()) + 4 * F32_EPS * weight.abs().max()


@pytest.mark.parametrize("qtype", INT4_TYPES, ids=lambda q: q.name)
def test_repacked_blocks_dequantize_through_the_kernel(qtype: Q) -> None:
    rows = _random_rows(qtype, 48, 512, seed=int(qtype))
    reference = _reference(rows, qtype)
    codes, scales, offsets, bits = affine_rows(rows, qtype, 512)
    linear = Int4Linear.from_affine(codes, scales, offsets, bits, 32, CPU)
    assert linear.pieces == (1 if bits == 4 else 2)
    got = _through_kernel(linear, 512)
    err = (got - reference).abs()
    assert torch.all(err <= _int4_bound(rows, qtype, reference)), err.max().item()
    # the dense copy kept for wide calls holds exactly gguf.quants' values
    stored = GGUFTensor(rows, int(qtype), (48, 512))
    with_copy = materialize_linear(_meta_linear(512, 48), {None: stored}, {}, CPU, _keep_quantized(torch.float32), None)
    assert with_copy.dense is None and torch.equal(with_copy.dense_copy(), reference)  # built on first use


def _check_real_values(rows: torch.Tensor, qtype: Q, row_length: int) -> None:
    """Blocks of real data: within the bound, and far below the format's own resolution (a tenth of a
    step, plus bfloat16's relative precision of the weight itself)."""
    reference = _reference(rows, qtype)
    codes, scales, offsets, bits = affine_rows(rows, qtype, row_length)
    got = _through_kernel(Int4Linear.from_affine(codes, scales, offsets, bits, 32, CPU), row_length)
    err = (got - reference).abs()
    assert torch.all(err <= _int4_bound(rows, qtype, reference))
    steps = scales.abs().repeat_interleave(32, dim=1)
    assert torch.all(err <= 0.1 * steps + 2 * U * reference.abs()), qtype.name


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0], ids=lambda q: q.name)
def test_quantized_real_values_dequantize_through_the_kernel(qtype: Q) -> None:
    values = np.random.default_rng(int(qtype)).standard_normal((48, 512)).astype(np.float32) * 0.05
    rows = torch.from_numpy(gguf.quants.quantize(values, qtype).view(np.uint8)).reshape(48, -1)
    _check_real_values(rows, qtype, 512)


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def test_real_smollm2_blocks_dequantize_through_the_kernel(qtype: Q, smollm2_gguf) -> None:
    file = read_gguf(smollm2_gguf)
    info = next(i for i in file.tensors if i.ggml_type == qtype and len(i.shape) == 2)
    rows = torch.from_numpy(file.raw(info)).view(info.shape[0], -1)[:256]
    _check_real_values(rows, qtype, info.shape[1])


def _keep_quantized(dense_dtype: torch.dtype | None = None) -> WeightPlan:
    return WeightPlan(torch.float32, keep_quantized=True, kernels=KernelPolicy(dense_dtype=dense_dtype))


def _meta_linear(in_features: int, out_features: int, sizes=None, bias=False) -> Linear:
    with torch.device("meta"):
        return Linear(in_features, out_features, bias, sizes)


@pytest.mark.parametrize("qtype", INT8_TYPES, ids=lambda q: q.name)
def test_other_types_are_requantized_to_8_bits_in_groups(qtype: Q) -> None:
    rows = _random_rows(qtype, 32, 512, seed=int(qtype))
    reference = _reference(rows, qtype)
    stored = GGUFTensor(rows, int(qtype), (32, 512))
    linear = materialize_linear(_meta_linear(512, 32), {None: stored}, {}, CPU, _keep_quantized(), None)
    assert isinstance(linear, Int4Linear) and linear.pieces == 2
    codes, scales, offsets = affine_groups(reference, 8)
    requantized = (codes.float().view(32, 16, 32) * scales[..., None] + offsets[..., None]).view(32, 512)
    step = scales.repeat_interleave(32, dim=1)
    zero = (offsets + 136 * scales).repeat_interleave(32, dim=1)
    # half a step of range/255 inside a group; at its ends the bf16 zero and scale can add U of each
    bound = step * (1 + U) / 2 + U * (zero.abs() + 255 * step) + 1e-7
    assert torch.all((requantized - reference).abs() <= bound)
    # the kernel computes with exactly these weights (a bf16 result of the identity product)
    got = _through_kernel(linear, 512)
    assert torch.all((got - requantized).abs() <= U * requantized.abs() + 1e-6)


def test_fused_blocks_of_different_types_keep_each_format(tmp_path) -> None:
    q = GGUFTensor(_random_rows(Q.Q4_K, 64, 256, 1), int(Q.Q4_K), (64, 256))
    k = GGUFTensor(_random_rows(Q.Q4_K, 32, 256, 2), int(Q.Q4_K), (32, 256))
    v = GGUFTensor(_random_rows(Q.Q6_K, 32, 256, 3), int(Q.Q6_K), (32, 256))
    module = _meta_linear(256, 128, [64, 32, 32], bias=True)
    biases = {i: torch.randn(n) for i, n in enumerate([64, 32, 32])}
    fused = materialize_linear(module, {0: q, 1: k, 2: v}, biases, CPU, _keep_quantized(), None)
    parts = fused.parts
    assert [p.pieces for p in parts] == [1, 2]  # q and k share one int4 matrix; v requantized to 8 bits
    assert parts[0].out_features == 96 and fused.output_sizes == [64, 32, 32]
    x = torch.randn(3, 256)
    reference = torch.cat([_reference(t.rows, Q(t.ggml_type)) for t in (q, k, v)])
    bias = torch.cat(list(biases.values()))
    expected = F.linear(x, reference, bias)
    assert torch.allclose(fused(x), expected, atol=0.02 * expected.abs().max().item())


def test_rows_decide_between_kernel_and_dense_copy() -> None:
    rows = _random_rows(Q.Q4_1, 64, 256, 7)
    stored = GGUFTensor(rows, int(Q.Q4_1), (64, 256))
    with_copy = materialize_linear(_meta_linear(256, 64), {None: stored}, {}, CPU, _keep_quantized(torch.float32), None)
    kernel_only = materialize_linear(_meta_linear(256, 64), {None: stored}, {}, CPU, _keep_quantized(None), None)
    assert with_copy.max_kernel_rows == 16 and torch.equal(with_copy.dense_copy(), _reference(rows, Q.Q4_1))
    x = torch.randn(17, 256)
    assert torch.equal(with_copy(x[:16]), kernel_only(x[:16]))  # few rows: the int4 kernel
    assert torch.equal(with_copy(x), F.linear(x, with_copy.dense))  # more: the exact dense copy
    assert not torch.equal(kernel_only(x), with_copy(x))  # (the two paths really differ)


# ---------------------------------------------------------------- load_in_8bit / load_in_4bit quantizers


@pytest.mark.parametrize("in_features", [128, 75, 33, 1])
def test_int8_per_row_quantization_error_is_bounded_by_half_a_step(in_features: int) -> None:
    torch.manual_seed(in_features)
    weight = torch.randn(12, in_features)
    weight[0] = 0.0  # an all-zero row must not divide by zero
    bias = torch.randn(12)
    linear = quantize_weight(weight, 8, CPU, bias=bias, per_row=True)
    assert isinstance(linear, Int8Linear)
    codes, scales = int8_rows(weight)
    step = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    assert torch.all(scales >= step) and torch.all(scales <= step * (1 + 2 * U))  # bf16, rounded up
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 127
    dequantized = linear.dequantized_weight()
    assert dequantized.shape == weight.shape and torch.all(dequantized[0] == 0)
    assert torch.all((dequantized - weight).abs() <= scales[:, None] / 2 + 4 * F32_EPS * weight.abs().max())
    x = torch.randn(5, in_features)
    exact = F.linear(x, dequantized, bias)
    # the kernel: bf16 inputs (rounded by U), float32 sums, a bf16 result
    kernel_bound = U * (x.abs() @ dequantized.abs().t()) * 2 + U * exact.abs() + 1e-5
    assert torch.all((linear(x) - exact).abs() <= kernel_bound)
    # |x . dw| <= sum|x| * scale/2 against the unquantized layer
    total = kernel_bound + x.abs().sum(-1, keepdim=True) * scales[None, :] / 2
    assert torch.all((linear(x) - F.linear(x, weight, bias)).abs() <= total)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("in_features", [128, 96, 75, 33, 1])
def test_group_quantization_error_is_bounded_by_half_a_step(in_features: int, bits: int) -> None:
    torch.manual_seed(in_features)
    weight = torch.randn(7, in_features)
    linear = quantize_weight(weight, bits, CPU)
    assert isinstance(linear, Int4Linear) and linear.pieces == bits // 4
    levels, centre = 2**bits - 1, (8 if bits == 4 else 136)
    codes, scales, offsets = affine_groups(weight, bits)
    groups = math.ceil(in_features / 32)
    assert codes.shape == weight.shape and int(codes.max()) <= levels and scales.shape == (7, groups)
    step = torch.empty_like(weight)
    for g in range(groups):
        part = weight[:, g * 32 : (g + 1) * 32]
        spread = part.amax(1, keepdim=True) - part.amin(1, keepdim=True)
        step[:, g * 32 : (g + 1) * 32] = (spread / levels).clamp(min=1e-12)
    zero = (offsets + centre * scales).repeat_interleave(32, dim=1)[:, :in_features]
    dequantized = linear.dequantized_weight()
    # half a step inside the group's range; at its two ends the bf16 rounding of the zero and of the
    # scale (`levels` steps) can add U of each
    bound = step * (1 + U) / 2 + U * (zero.abs() + levels * step) + 4 * F32_EPS * weight.abs().max()
    assert torch.all((dequantized - weight).abs() <= bound)
    stored = sum(b.numel() * b.element_size() for b in linear.buffers())
    # 4 bits per weight and piece plus a bf16 scale and zero per group and piece, N padded to 16 rows
    pieces = bits // 4
    assert stored <= 16 * pieces * (groups * 32 // 2 + 4 * groups)
    x = torch.randn(5, in_features)
    exact = F.linear(x, dequantized)
    assert torch.all((linear(x) - exact).abs() <= U * (x.abs() @ dequantized.abs().t()) * 2 + U * exact.abs() + 1e-5)


def test_half_keeps_the_kernel_dtypes() -> None:
    linear = quantize_weight(torch.randn(16, 64), 4, CPU)
    linear.half()
    assert linear.scale_and_zeros.dtype == torch.bfloat16
    x = torch.randn(2, 64).half()
    assert linear(x).dtype == torch.float16
