"""No silent weight changes: a checkpoint tensor the model has no parameter for is an error (a short
allowlist of known-harmless buffers aside), a missing one too; GGUF rope settings stored outside the
config (Gemma 3's linear scaling metadata, llama.cpp's rope factor tensors) are used or refused."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file, save_file

from tests import tiny_models
from tests.tiny_models import VOCAB, reference_logits, write_gguf
from tokenloom.config import EngineConfig
from tokenloom.engine.engine import Engine
from tokenloom.errors import ModelLoadError, UnsupportedModelError
from tokenloom.loading import load_model
from tokenloom.loading.build import is_ignored_tensor
from tokenloom.loading.gguf_loader import load_gguf_checkpoint

transformers = pytest.importorskip("transformers")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

LLAMA = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
)  # fmt: skip


@pytest.fixture
def llama_dir(tmp_path, one_torch_thread):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    model.save_pretrained(tmp_path)
    return tmp_path


def _edit(directory, edit) -> None:
    path = directory / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def test_unexpected_tensor_is_an_error(llama_dir) -> None:
    """q/k/v biases under a config without attention_bias: loading must not drop them."""
    _edit(llama_dir, lambda state: state.update({"model.layers.1.self_attn.q_proj.bias": torch.ones(64)}))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.self_attn\.q_proj\.bias") as info:
        load_model(llama_dir, device_map="cpu", dtype="float32")
    assert "attention_bias" in (info.value.hint or "")


def test_missing_tensor_is_an_error(llama_dir) -> None:
    _edit(llama_dir, lambda state: state.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"lacks 1 weight.*model\.layers\.0\.mlp\.up_proj\.weight"):
        load_model(llama_dir, device_map="cpu", dtype="float32")


def test_allowlisted_tensors_load(llama_dir) -> None:
    reference = transformers.LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    _edit(llama_dir, lambda state: state.update({
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8),
        "model.rotary_emb.inv_freq": torch.ones(8),
    }))  # fmt: skip
    engine = Engine(
        load_model(llama_dir, device_map="cpu", dtype="float32").model, EngineConfig(block_size=4)
    )
    prompt = [1, 5, 9, 33, 7]
    assert (engine.prompt_logits([prompt])[0] - reference_logits(reference, prompt)).abs().max() <= 1e-4


def test_allowlist() -> None:
    for name in (
        "transformer.h.0.attn.bias", "transformer.h.11.attn.masked_bias", "model.rotary_emb.inv_freq",
        "model.layers.3.self_attn.rotary_emb.inv_freq", "vision_tower.vision_model.post_layernorm.weight",
        "model.multi_modal_projector.mm_input_projection_weight",
    ):  # fmt: skip
        assert is_ignored_tensor(name), name
    for name in (
        "model.layers.0.self_attn.q_proj.bias", "model.layers.0.attn.bias", "rope_freqs.weight",
        "rope_factors_long.weight", "lm_head.bias", "transformer.h.0.attn.c_attn.bias_extra",
    ):  # fmt: skip
        assert not is_ignored_tensor(name), name


# ---------------------------------------------------------------- GGUF rope settings


def _gemma3_gguf(path, monkeypatch, **extra_kv):
    """A tiny gemma3 GGUF with 6 layers, so that the last one is a global (full-attention) layer."""
    monkeypatch.setattr(tiny_models, "LAYERS", 6)
    kv, tensors = tiny_models._decoder_case("gemma3", np.random.default_rng(7))
    return write_gguf(path, "gemma3", {**kv, **extra_kv}, tensors)


def test_gemma3_gguf_linear_rope_scaling(tmp_path, monkeypatch, one_torch_thread) -> None:
    path = _gemma3_gguf(
        tmp_path / "gemma3.gguf", monkeypatch,
        **{"{arch}.rope.scaling.type": "linear", "{arch}.rope.scaling.factor": 8.0},
    )  # fmt: skip
    config = load_gguf_checkpoint(path).config
    assert config["layer_types"][-1] == "full_attention"
    assert config["rope_parameters"] == {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0},
    }
    # transformers' GGUF loader drops the scaling keys: its model gets them through the config
    hf_config = transformers.AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name)
    unscaled = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32, config=hf_config
    ).eval()
    hf_config = transformers.AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name)
    hf_config.rope_parameters["full_attention"].update(rope_type="linear", factor=8.0)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32, config=hf_config
    ).eval()
    engine = Engine(load_model(path, device_map="cpu", dtype="float32").model, EngineConfig(block_size=4))
    prompt = [(7 * i + 3) % VOCAB for i in range(24)]
    logits = engine.prompt_logits([prompt])[0]
    assert (logits - reference_logits(reference, prompt)).abs().max() <= 1e-4
    assert (logits - reference_logits(unscaled, prompt)).abs().max() > 1e-2  # the scaling matters


def test_gemma3_gguf_without_scaling_keys_is_unscaled(tmp_path, monkeypatch) -> None:
    path = _gemma3_gguf(tmp_path / "gemma3.gguf", monkeypatch, **{"{arch}.rope.scaling.type": "none"})
    full = load_gguf_checkpoint(path).config["rope_parameters"]["full_attention"]
    assert full == {"rope_type": "default", "rope_theta": 10000.0}


def test_gemma3_gguf_unknown_rope_scaling(tmp_path, monkeypatch) -> None:
    path = _gemma3_gguf(
        tmp_path / "gemma3.gguf", monkeypatch,
        **{"{arch}.rope.scaling.type": "yarn", "{arch}.rope.scaling.factor": 4.0},
    )  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="'yarn'"):
        load_gguf_checkpoint(path)


@pytest.mark.parametrize(
    ("arch", "tensor"), [("phi3", "rope_factors_long.weight"), ("llama", "rope_freqs.weight")]
)
def test_gguf_rope_factor_tensors_are_refused(arch: str, tensor: str, tmp_path) -> None:
    kv, tensors = tiny_models._decoder_case(arch, np.random.default_rng(0))
    tensors[tensor] = (np.linspace(1.0, 3.0, 8), Q.F32)  # no llama3 parameters give these
    path = write_gguf(tmp_path / f"{arch}.gguf", arch, kv, tensors)
    with pytest.raises(UnsupportedModelError, match=tensor.replace(".", r"\.")) as info:
        load_gguf_checkpoint(path)
    assert "Hugging Face checkpoint" in (info.value.hint or "")


def _llama3_factors(head_dim: int, theta: float, factor: float) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf: the rope_freqs tensor of a llama3-scaled model."""
    import math

    low, high, old_context = 1.0, 4.0, 8192
    factors = []
    for freq in 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def test_llama3_gguf_rope_freqs_become_llama3_rope(tmp_path, one_torch_thread) -> None:
    """Llama 3.x GGUFs: no scaling metadata, a rope_freqs tensor instead (theta 500000, head_dim 16
    put dimensions in all three llama3 bands)."""
    kv, tensors = tiny_models._decoder_case("llama", np.random.default_rng(0))
    kv["{arch}.rope.freq_base"] = 500000.0
    tensors["rope_freqs.weight"] = (_llama3_factors(16, 500000.0, 32.0), Q.F32)
    path = write_gguf(tmp_path / "llama.gguf", "llama", kv, tensors)
    checkpoint = load_gguf_checkpoint(path)
    assert checkpoint.config["rope_parameters"] == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_theta": 500000.0,
    }  # fmt: skip
    assert "rope_freqs.weight" not in dict(checkpoint.iter_tensors())
    assert checkpoint.num_tensors == len(tensors) - 1

    hf_config = transformers.AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name)
    hf_config.rope_parameters = dict(checkpoint.config["rope_parameters"])
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32, config=hf_config
    ).eval()
    engine = Engine(load_model(path, device_map="cpu", dtype="float32").model, EngineConfig(block_size=4))
    prompt = [(7 * i + 3) % VOCAB for i in range(24)]
    assert (engine.prompt_logits([prompt])[0] - reference_logits(reference, prompt)).abs().max() <= 1e-4


def test_full_gemma3_config_json_is_read(tmp_path) -> None:
    """A model_type "gemma3" directory resolves to the gemma3_text architecture."""
    from tokenloom.models.gemma3 import Gemma3ForCausalLM
    from tokenloom.models.registry import model_class_for

    assert model_class_for(json.loads('{"model_type": "gemma3", "text_config": {}}')) is Gemma3ForCausalLM
