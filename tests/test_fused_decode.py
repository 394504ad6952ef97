"""The fused CPU decode ops (kernels/cpu_decode.c) against the torch ops they replace, and the fused
decode step (models/fused_decode.py) against the eager step of the same model."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from tests import tiny_models
from tests.tiny_models import engine_greedy
from tokenloom.attention.decode import DecodeMetadata
from tokenloom.attention.paged import _attend_one_query
from tokenloom.cache.kv_cache import KVCache
from tokenloom.config import EngineConfig
from tokenloom.engine.engine import Engine
from tokenloom.kernels import cpu_decode
from tokenloom.kernels.cpu_decode import BFLOAT16, FLOAT32
from tokenloom.loading import load_model
from tokenloom.models.fused_decode import FusedDecode
from tokenloom.models.layers import apply_rotary, rope_tables

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ops() -> cpu_decode.CpuDecodeOps:
    built = cpu_decode.ops()
    if built is None:
        if shutil.which("cc") or shutil.which("gcc"):
            pytest.fail("a C compiler is on the PATH but the fused decode ops did not build (see the log)")
        pytest.skip("no C compiler: the fused decode ops are not built here")
    return built


def _bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance between two bfloat16 tensors in units in the last place."""
    ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
    return int((ia - ib).abs().max())


@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rmsnorm_matches_torch(ops, with_delta: bool) -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 576, generator=g) * 3
    delta = torch.randn(5, 576, generator=g).bfloat16()
    weight = torch.randn(576, generator=g)
    expected_hidden = hidden + delta.float() if with_delta else hidden.clone()
    expected = F.rms_norm(expected_hidden, (576,), weight, 1e-5)
    for dtype, code in ((torch.float32, FLOAT32), (torch.bfloat16, BFLOAT16)):
        h = hidden.clone()
        out = torch.empty(5, 576, dtype=dtype)
        ops.add_rmsnorm(h.data_ptr(), delta.data_ptr() if with_delta else None, BFLOAT16, weight.data_ptr(),
                        1e-5, 5, 576, out.data_ptr(), code)
        assert torch.equal(h, expected_hidden)  # the residual add is exact
        if dtype == torch.float32:
            torch.testing.assert_close(out, expected, rtol=2e-6, atol=1e-6)
        else:  # the same float32 value up to its last bits, then rounded as torch rounds
            assert _bf16_ulps(out, expected.bfloat16()) <= 1


def test_rope_write_matches_apply_rotary_and_the_cache_write(ops) -> None:
    g = torch.Generator().manual_seed(1)
    rows, heads, kv_heads, head_dim = 3, 9, 3, 64
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=g).bfloat16()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    positions = torch.tensor([0, 17, 300])
    cos, sin = rope_tables(positions.float()[:, None] * inv_freq[None], 1.0, torch.float32)
    slots = torch.tensor([5, 40, 2])
    k_cache, v_cache = torch.zeros(48, kv_heads, head_dim), torch.zeros(48, kv_heads, head_dim)
    q_out = torch.empty(rows, heads, head_dim)
    ops.rope_write(qkv.data_ptr(), BFLOAT16, rows, heads, kv_heads, head_dim, cos.contiguous().data_ptr(),
                   sin.contiguous().data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(),
                   q_out.data_ptr())
    q, k, v = qkv.float().split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q_ref = apply_rotary(q.view(rows, heads, head_dim), cos, sin)
    k_ref = apply_rotary(k.reshape(rows, kv_heads, head_dim), cos, sin)
    assert torch.equal(q_out, q_ref)  # the same products and sums, in the same order
    assert torch.equal(k_cache[slots], k_ref)
    assert torch.equal(v_cache[slots], v.reshape(rows, kv_heads, head_dim))
    untouched = torch.ones(48, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache[untouched].any() and not v_cache[untouched].any()


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4)])
def test_attend_matches_torch_over_paged_blocks(ops, heads: int, kv_heads: int) -> None:
    g = torch.Generator().manual_seed(2)
    block_size, head_dim, num_blocks = 4, 64, 40
    k_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim, generator=g)
    lengths = [1, 7, 23, 64]  # rows of different lengths, blocks scattered over the pool
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables, start = [], 0
    for n in lengths:
        count = -(-n // block_size)
        tables.append(order[start : start + count])
        start += count
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = torch.randn(len(lengths), heads, head_dim, generator=g)
    out = torch.empty(len(lengths), heads * head_dim)
    scale = head_dim**-0.5
    assert ops.attend(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), table.data_ptr(), table.stride(0),
                      torch.tensor(lengths).data_ptr(), block_size, len(lengths), heads, kv_heads, head_dim,
                      scale, out.data_ptr(), FLOAT32) == 0
    for row, (n, blocks) in enumerate(zip(lengths, tables)):
        slots = (torch.tensor(blocks)[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:n]
        expected = _attend_one_query(q[row : row + 1], k_cache[slots][None], v_cache[slots][None], None, scale)
        torch.testing.assert_close(out[row], expected.reshape(-1), rtol=1e-5, atol=1e-6)


def test_silu_mul_matches_torch(ops) -> None:
    g = torch.Generator().manual_seed(3)
    gate_up = (torch.randn(4, 2 * 1536, generator=g) * 6).bfloat16()
    out = torch.empty(4, 1536)
    ops.silu_mul(gate_up.data_ptr(), BFLOAT16, 4, 1536, out.data_ptr(), FLOAT32)
    gate, up = gate_up.float().split(1536, dim=-1)
    torch.testing.assert_close(out, F.silu(gate) * up, rtol=1e-6, atol=1e-7)
    # extreme inputs stay finite and right: silu(-100) is -0 to float32's precision, silu(100) = 100
    edge = torch.tensor([[-100.0, 0.0, 100.0, 1.0, 1.0, 1.0]])
    out = torch.empty(1, 3)
    ops.silu_mul(edge.data_ptr(), FLOAT32, 1, 3, out.data_ptr(), FLOAT32)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 100.0]]), atol=1e-30, rtol=1e-6)


# ---------------------------------------------------------------- the fused step of a whole model


@pytest.fixture(scope="module")
def quantized_llama(tmp_path_factory) -> Path:
    """A tiny random Llama whose every projection is stored quantized (the default mode then runs
    all of them on the int4 kernel, which is what the fused step takes): Q4_1 as SmolLM2's, the
    attention output Q8_0 (two 4-bit pieces)."""
    rng = np.random.default_rng(7)
    kv, tensors = tiny_models._decoder_case("llama", rng)
    for name, (values, _) in list(tensors.items()):
        if name.startswith("blk.") and name.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight",
                                                      "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")):
            tensors[name] = (values, Q.Q4_1)
        elif name.startswith("blk.") and name.endswith("attn_output.weight"):
            tensors[name] = (values, Q.Q8_0)
    return tiny_models.write_gguf(tmp_path_factory.mktemp("fused") / "llama.gguf", "llama", kv, tensors)


def test_plan_applies_to_the_default_mode_only(ops, quantized_llama) -> None:
    assert FusedDecode.plan(load_model(quantized_llama).model) is not None
    assert FusedDecode.plan(load_model(quantized_llama, dtype="float32").model) is None  # exact mode: eager


@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "qwen2"])
def test_plan_refuses_other_layer_shapes(ops, tmp_path, arch: str) -> None:
    # QK-norm, Gemma's norms and sliding windows, q/k/v biases: the eager step runs them
    model = load_model(tiny_models.write_tiny_gguf(tmp_path, arch)).model
    assert FusedDecode.plan(model) is None


def _decode_both_ways(model, kv: KVCache, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    for i in range(kv.num_layers):
        kv.keys[i].copy_(torch.randn(kv.keys[i].shape, generator=g))
        kv.values[i].copy_(torch.randn(kv.values[i].shape, generator=g))
    tables, start = [], 1
    for n in lengths:
        count = -(-n // kv.block_size)
        tables.append(list(range(start, start + count)))
        start += count
    ids = [int(x) for x in torch.randint(0, tiny_models.VOCAB, (len(lengths),), generator=g)]

    def meta() -> DecodeMetadata:
        return DecodeMetadata.build(ids, lengths, tables, kv.block_size, torch.device("cpu"), kv.scratch_slot)

    with torch.inference_mode():
        model._fused = None  # eager
        m = meta()
        eager = model(m.input_ids, m.positions, kv, m)
        model._fused = False  # planned again on this call: fused
        m = meta()
        fused = model(m.input_ids, m.positions, kv, m)
        assert model._fused is not None
    return eager, fused


@pytest.mark.parametrize("lengths", [[1], [9], [3, 17, 30], [40] * 20])
def test_fused_step_matches_the_eager_step(ops, quantized_llama, lengths: list[int]) -> None:
    # 20 rows take the float32 dense copies (wider than the kernel's 16 rows), the others the kernel
    model = load_model(quantized_llama).model
    kv = KVCache(len(model.model.layers), 256, 4, tiny_models.KV_HEADS, tiny_models.HIDDEN // tiny_models.HEADS,
                 torch.float32, torch.device("cpu"))
    eager, fused = _decode_both_ways(model, kv, lengths)
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4)


def test_long_context_takes_torch_attention_with_the_same_result(ops, quantized_llama, monkeypatch) -> None:
    from tokenloom.models import fused_decode

    model = load_model(quantized_llama).model
    kv = KVCache(len(model.model.layers), 256, 4, tiny_models.KV_HEADS, tiny_models.HIDDEN // tiny_models.HEADS,
                 torch.float32, torch.device("cpu"))
    monkeypatch.setattr(fused_decode, "C_ATTENTION_MAX_KEYS", 8)  # 30 keys: torch's matmuls
    eager, fused = _decode_both_ways(model, kv, [30])
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4)


def test_greedy_generation_is_the_eager_one(ops, quantized_llama) -> None:
    loaded = load_model(quantized_llama)
    prompts = [[5, 6, 7], [9] * 12, list(range(10, 40))]
    fused = engine_greedy(Engine(loaded.model, EngineConfig(max_num_seqs=4)), prompts, 24)
    assert loaded.model.fused_decode() is not None
    loaded.model._fused = None
    eager = engine_greedy(Engine(loaded.model, EngineConfig(max_num_seqs=4)), prompts, 24)
    assert fused == eager


def test_switched_off_by_the_environment(monkeypatch) -> None:
    monkeypatch.setattr(cpu_decode, "_TRIED", False)
    monkeypatch.setattr(cpu_decode, "_OPS", None)
    monkeypatch.setenv(cpu_decode.ENV_SWITCH, "0")
    assert cpu_decode.ops() is None


def test_without_a_compiler_the_ops_are_absent(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(cpu_decode, "_TRIED", False)
    monkeypatch.setattr(cpu_decode, "_OPS", None)
    monkeypatch.setenv("TOKENLOOM_HOME", str(tmp_path))  # nothing built yet
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    assert cpu_decode.ops() is None
    assert not (tmp_path / "kernels").exists()


def test_built_once_into_the_cache(monkeypatch, tmp_path) -> None:
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler")
    monkeypatch.setattr(cpu_decode, "_TRIED", False)
    monkeypatch.setattr(cpu_decode, "_OPS", None)
    monkeypatch.setenv("TOKENLOOM_HOME", str(tmp_path))
    built = cpu_decode.ops()
    assert built is not None and built.path.parent == tmp_path / "kernels" and built.path.exists()
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [built.path.name]  # no temporary left
