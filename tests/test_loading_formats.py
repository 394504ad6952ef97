"""Per-parameter loading (loading/build.py, formats.py): fused qkv_proj / gate_up_proj filled from a
checkpoint's separate tensors, each GGUF block type in its format, the default mode against the exact
mode on every tiny architecture, hf_state_dict back to the checkpoint's own tensors, one header parse
per load, and memory-mapped safetensors. transformers is the oracle for names and values."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.tiny_models import ARCHS, reference_logits, write_tiny_gguf
from tokenloom.config import EngineConfig
from tokenloom.engine.engine import Engine
from tokenloom.loading import gguf_cache, load_model
from tokenloom.loading.export import hf_state_dict
from tokenloom.loading.safetensors_mmap import SafetensorsMap
from tokenloom.models.head import ShortlistHead
from tokenloom.models.linear import ConcatLinear, GGUFEmbedding, Int4Linear, Linear

transformers = pytest.importorskip("transformers")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

LLAMA = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_gguf_formats")
    return {arch: write_tiny_gguf(root, arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama_hf")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval().save_pretrained(path)
    return path


def test_fused_projections_are_filled_from_the_separate_tensors(llama_dir) -> None:
    model = load_model(llama_dir, device_map="cpu", dtype="float32").model
    with safe_open(str(llama_dir / "model.safetensors"), framework="pt") as f:
        for i in range(LLAMA["num_hidden_layers"]):
            layer = model.model.layers[i]
            prefix = f"model.layers.{i}."
            qkv = torch.cat([f.get_tensor(prefix + f"self_attn.{n}_proj.weight") for n in "qkv"])
            gate_up = torch.cat([f.get_tensor(prefix + f"mlp.{n}_proj.weight") for n in ("gate", "up")])
            assert torch.equal(layer.self_attn.qkv_proj.weight, qkv)
            assert torch.equal(layer.mlp.gate_up_proj.weight, gate_up)
            assert layer.self_attn.qkv_proj.output_sizes == [64, 32, 32]


def test_missing_block_of_a_fused_projection_is_named(llama_dir, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    for item in llama_dir.iterdir():
        (tmp_path / item.name).symlink_to(item)
    state = load_file(llama_dir / "model.safetensors")
    state.pop("model.layers.1.self_attn.k_proj.weight")
    (tmp_path / "model.safetensors").unlink()
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    from tokenloom.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"lacks 1 weight.*model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(tmp_path, device_map="cpu", dtype="float32")


def test_each_gguf_block_type_gets_its_format(tiny_ggufs) -> None:
    """The tiny llama stores q Q8_0, k Q4_1, v Q8_0, gate Q4_0, up Q5_1, down F16, output Q4_0 (the
    output projection keeps a dense float32 weight, with its blocks on the kernel for the shortlist
    of decode steps)."""
    model = load_model(tiny_ggufs["llama"], device_map="cpu").model
    layer = model.model.layers[0]
    qkv, gate_up = layer.self_attn.qkv_proj, layer.mlp.gate_up_proj
    assert isinstance(qkv, ConcatLinear) and [p.pieces for p in qkv.parts] == [2, 1, 2]
    assert isinstance(gate_up, ConcatLinear) and [p.pieces for p in gate_up.parts] == [1, 2]
    assert isinstance(layer.self_attn.o_proj, Int4Linear) and layer.self_attn.o_proj.pieces == 2  # Q8_0
    assert type(layer.mlp.down_proj) is Linear  # F16: dense
    assert type(model.lm_head) is ShortlistHead and model.lm_head.weight.dtype == torch.float32
    assert isinstance(model.model.embed_tokens, GGUFEmbedding)  # untied: the embedding keeps its blocks
    gemma = load_model(tiny_ggufs["gemma3"], device_map="cpu").model  # tied: one dense Parameter for both
    assert gemma.lm_head.weight is gemma.model.embed_tokens.weight
    assert isinstance(gemma.lm_head, ShortlistHead)
    exact = load_model(tiny_ggufs["llama"], device_map="cpu", dtype="float32").model
    assert type(exact.lm_head) is Linear


@pytest.mark.parametrize("arch", ARCHS)
def test_default_mode_stays_close_to_the_exact_mode(arch, tiny_ggufs) -> None:
    """The kernels take bfloat16 activations and scales (8 significant bits), like the bfloat16 dense
    mode, whose error on these random two-layer models is 0.4-2% of the mean |logit| (and up to 5% is
    accepted for it on SmolLM2): the same bound here. The exact mode matches transformers."""
    path = tiny_ggufs[arch]
    exact = Engine(load_model(path, device_map="cpu", dtype="float32").model, EngineConfig(block_size=4))
    default = Engine(load_model(path, device_map="cpu").model, EngineConfig(block_size=4))
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    prompt = [1, 5, 9, 33, 7, 60, 12]
    want = reference_logits(reference, prompt)
    got_exact = exact.prompt_logits([prompt])[0]
    got_default = default.prompt_logits([prompt])[0]
    assert (got_exact - want).abs().max() <= 1e-4
    assert (got_default - want).abs().mean() <= 0.05 * want.abs().mean(), arch


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_state_dict_gives_back_the_checkpoint_tensors(arch, tiny_ggufs) -> None:
    path = tiny_ggufs[arch]
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    expected = reference.state_dict()
    ours = hf_state_dict(load_model(path, device_map="cpu", dtype="float32").model)
    tied = {"lm_head.weight"} if reference.config.tie_word_embeddings else set()
    assert set(ours) - tied == set(expected) - tied
    for name, tensor in ours.items():
        assert torch.equal(tensor, expected[name]), name
    # the default mode's weights come back as the values its kernels compute with: close, same names
    quantized = hf_state_dict(load_model(path, device_map="cpu").model)
    assert set(quantized) == set(ours)
    for name, tensor in quantized.items():
        scale = expected[name].abs().max().item() or 1.0
        assert (tensor - expected[name]).abs().max().item() <= 0.01 * scale, name


def test_one_header_parse_per_load(smollm2_gguf, tmp_path, monkeypatch) -> None:
    from tokenloom import LLM

    path = tmp_path / smollm2_gguf.name
    shutil.copyfile(smollm2_gguf, path)
    calls = []
    real = gguf_cache.read_gguf
    monkeypatch.setattr(gguf_cache, "read_gguf", lambda p, *rest: calls.append(p) or real(p, *rest))
    gguf_cache.clear_cache()
    LLM(str(path), device_map="cpu")  # the checkpoint and the tokenizer
    assert len(calls) == 1
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # "replaced" on disk
    LLM(str(path), device_map="cpu")
    assert len(calls) == 2


def test_safetensors_tensors_are_views_of_the_file_map(llama_dir) -> None:
    mapped = SafetensorsMap(llama_dir / "model.safetensors")
    start = mapped.data.ctypes.data
    with safe_open(str(llama_dir / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            tensor = mapped.tensor(name)
            assert torch.equal(tensor, f.get_tensor(name)), name
            pointer = tensor.untyped_storage().data_ptr()
            assert start <= pointer < start + mapped.data.shape[0]  # no copy: inside the map
    embed = mapped.tensor("model.embed_tokens.weight")
    embed.zero_()  # copy-on-write: the file keeps its bytes
    again = SafetensorsMap(llama_dir / "model.safetensors").tensor("model.embed_tokens.weight")
    assert not torch.equal(again, embed) and np.count_nonzero(again.numpy()) > 0


def test_import_tokenloom_loads_no_heavy_module() -> None:
    """`import tokenloom` stays fast: torch, numpy and gguf are imported when a model is loaded."""
    import subprocess
    import sys

    code = "import sys, tokenloom; print(sorted(m for m in ('torch', 'numpy', 'gguf') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_compile_with_quantized_weights_warns_and_runs_eagerly(tiny_ggufs) -> None:
    from tokenloom.engine.engine import Engine
    from tokenloom.models.linear import QuantizedLinear

    model = load_model(tiny_ggufs["llama"], device_map="cpu").model  # the default mode: int4 kernels
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())
    with pytest.warns(RuntimeWarning, match="runs eagerly .*quantized"):
        engine = Engine(model, EngineConfig(compile=True))
    assert engine.runner.compiled is None
    assert Engine(model, EngineConfig(compile=None)).runner.compiled is None  # and silently under None
