"""GGUF blocks unpacked in one C pass at load (kernels/cpu_decode.c): the same values as gguf.quants
(and as the torch dequantizers), and the same int4 layout as the torch packing route."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from gguf import quants as gguf_quants
from gguf.constants import GGMLQuantizationType as Q

from tokenloom.kernels import cpu_decode, ggml
from tokenloom.loading import formats
from tokenloom.loading.gguf_quants import GGUFTensor
from tokenloom.models.linear import Int4Linear


@pytest.fixture(scope="module", autouse=True)
def native() -> None:
    if cpu_decode.ops() is None:
        if shutil.which("cc") or shutil.which("gcc"):
            pytest.fail("a C compiler is on the PATH but the native ops did not build")
        pytest.skip("no C compiler")


SIZES = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20}
# float16 scales that test the conversion: zero, negative zero, subnormals, the largest, infinities, NaN
SPECIAL_HALVES = np.array([0x0000, 0x8000, 0x0001, 0x03FF, 0x8200, 0x7BFF, 0x7C00, 0xFC00, 0x7E00, 0x3C00], np.uint16)


def _random_blocks(kind: Q, count: int, seed: int, special: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (count, SIZES[kind]), dtype=np.uint8)
    halves = (rng.standard_normal(count * 2) * 0.02).astype(np.float16).view(np.uint16)
    if special:
        halves[: len(SPECIAL_HALVES)] = SPECIAL_HALVES
        halves[count : count + len(SPECIAL_HALVES)] = SPECIAL_HALVES[::-1]
    blocks[:, 0:2] = halves[:count].view(np.uint8).reshape(count, 2)
    if kind == Q.Q4_1:
        blocks[:, 2:4] = halves[count:].view(np.uint8).reshape(count, 2)
    return blocks


def _same_floats(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit for bit, except that any NaN equals any NaN."""
    a, b = a.astype(np.float32).ravel(), b.astype(np.float32).ravel()
    nan = np.isnan(a)
    return bool((nan == np.isnan(b)).all() and (a[~nan].view(np.uint32) == b[~nan].view(np.uint32)).all())


@pytest.mark.parametrize("kind", [Q.Q8_0, Q.Q4_0, Q.Q4_1])
@pytest.mark.parametrize("special", [False, True])
def test_dequantized_as_gguf_quants(kind: Q, special: bool) -> None:
    blocks = _random_blocks(kind, 300, int(kind), special)
    out = torch.empty(300, 32)
    ggml.TORCH_DEQUANTIZERS[kind](torch.from_numpy(blocks), out)
    with np.errstate(all="ignore"):
        expected = gguf_quants.dequantize(blocks, kind)
    assert _same_floats(out.numpy(), expected)


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1])
@pytest.mark.parametrize("rows,cols", [(16, 32), (48, 64), (64, 576), (112, 96), (192, 64)])
def test_packed_as_the_torch_route_packs(kind: Q, rows: int, cols: int) -> None:
    blocks = _random_blocks(kind, rows * cols // 32, rows + cols)
    tensor = GGUFTensor(torch.from_numpy(blocks).view(rows, -1), int(kind), (rows, cols))
    native = formats._native_pack([tensor], torch.device("cpu"))
    assert native is not None
    codes, scales, offsets, bits = tensor.affine()
    expected = Int4Linear.from_affine(codes, scales, offsets, bits, 32, torch.device("cpu"))
    assert torch.equal(native[0], expected.packed)
    assert torch.equal(native[1].view(torch.int16), expected.scale_and_zeros.view(torch.int16))
    assert native[2] == expected.layout


def test_fused_rows_are_packed_together() -> None:
    # q, k and v of one projection: three stored tensors, one packed matrix (as the torch route cats them)
    parts = [GGUFTensor(torch.from_numpy(_random_blocks(Q.Q4_1, n * 2, n)).view(n, -1), int(Q.Q4_1), (n, 64))
             for n in (64, 16, 48)]
    native = formats._native_pack(parts, torch.device("cpu"))
    assert native is not None
    affine = [p.affine() for p in parts]
    expected = Int4Linear.from_affine(*(torch.cat([a[i] for a in affine]) for i in range(3)), 4, 32, torch.device("cpu"))
    assert torch.equal(native[0], expected.packed)
    assert torch.equal(native[1].view(torch.int16), expected.scale_and_zeros.view(torch.int16))


def test_other_types_and_shapes_take_the_torch_route() -> None:
    q8 = GGUFTensor(torch.from_numpy(_random_blocks(Q.Q8_0, 32, 1)).view(16, -1), int(Q.Q8_0), (16, 64))
    assert formats._native_pack([q8], torch.device("cpu")) is None  # two 4-bit pieces: torch's route
    odd = GGUFTensor(torch.from_numpy(_random_blocks(Q.Q4_1, 10, 2)).view(10, -1), int(Q.Q4_1), (10, 32))
    assert formats._native_pack([odd], torch.device("cpu")) is None  # rows the kernel pads
    mixed = [GGUFTensor(torch.from_numpy(_random_blocks(t, 32, 3)).view(16, -1), int(t), (16, 64))
             for t in (Q.Q4_0, Q.Q4_1)]
    assert formats._native_pack(mixed, torch.device("cpu")) is None


def test_without_the_ops_the_torch_dequantizers_run(monkeypatch) -> None:
    blocks = _random_blocks(Q.Q4_1, 64, 9)
    native_out = torch.empty(64, 32)
    ggml.TORCH_DEQUANTIZERS[Q.Q4_1](torch.from_numpy(blocks), native_out)
    monkeypatch.setattr(cpu_decode, "ops", lambda: None)
    torch_out = torch.empty(64, 32)
    ggml.TORCH_DEQUANTIZERS[Q.Q4_1](torch.from_numpy(blocks), torch_out)
    assert torch.equal(native_out, torch_out)
    tensor = GGUFTensor(torch.from_numpy(blocks).view(16, -1), int(Q.Q4_1), (16, 128))
    assert formats._native_pack([tensor], torch.device("cpu")) is None
