"""qwen2, qwen3, phi3 and gpt2 against transformers: tiny random models written by save_pretrained
(and tiny GGUF files read by both), fp32 logits for prompts of different lengths and greedy tokens."""

from __future__ import annotations

import os

import pytest
import torch

from tests.tiny_models import (
    VOCAB,
    engine_greedy,
    reference_greedy,
    reference_logits,
    write_tiny_gguf,
)
from tokenloom.config import EngineConfig
from tokenloom.engine.engine import Engine
from tokenloom.loading import load_model

transformers = pytest.importorskip("transformers")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# lengths 5, 1, 19 and 3: longer and shorter than the sliding windows below, and 32 generated tokens
# take every prompt past them
PROMPTS = [[1, 5, 9, 33, 7], [2], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [40, 41, 42]]
NUM_TOKENS = 32
TOLERANCE = 1e-4

_DECODER = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    pad_token_id=0,
)  # fmt: skip
CONFIGS = {
    "qwen2": ("qwen2", dict(_DECODER)),
    # the layers from max_window_layers on attend the last 6 positions only
    "qwen2-sliding": ("qwen2", dict(_DECODER, use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    # a head width of its own (not hidden / heads), biases on all four projections, tied lm_head
    "qwen3": ("qwen3", dict(_DECODER, head_dim=24, attention_bias=True, tie_word_embeddings=True)),
    "phi3": ("phi3", dict(_DECODER, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                     "partial_rotary_factor": 0.5})),  # fmt: skip
    "phi3-sliding": ("phi3", dict(_DECODER, sliding_window=7)),
    "gpt2": ("gpt2", dict(vocab_size=97, n_embd=64, n_layer=3, n_head=4, n_positions=128,
                          scale_attn_by_inverse_layer_idx=True, bos_token_id=1, eos_token_id=2)),  # fmt: skip
}


def _reference_and_engine(model_type: str, values: dict, path, seed: int = 0) -> tuple:
    """A random transformers model written to `path` by save_pretrained, and tokenloom's engine on it."""
    torch.manual_seed(seed)
    reference = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(model_type, **values), dtype=torch.float32
    ).eval()
    with torch.no_grad():  # biases start at zero and norms at one: noise makes every parameter count
        for parameter in reference.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    reference.save_pretrained(path)
    loaded = load_model(path, device_map="cpu", dtype="float32")
    return reference, Engine(loaded.model, EngineConfig(block_size=4))


def _assert_logits_match(reference, engine: Engine, prompts: list[list[int]]) -> None:
    for prompt, logits in zip(prompts, engine.prompt_logits(prompts), strict=True):
        assert (logits - reference_logits(reference, prompt)).abs().max().item() <= TOLERANCE


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, tmp_path_factory, one_torch_thread):
    """(transformers model, tokenloom engine) over the same save_pretrained directory."""
    model_type, values = CONFIGS[request.param]
    return _reference_and_engine(model_type, values, tmp_path_factory.mktemp(request.param))


def test_logits_match_transformers(tiny) -> None:
    _assert_logits_match(*tiny, PROMPTS)


def test_greedy_tokens_match_transformers(tiny) -> None:
    reference, engine = tiny
    expected = [reference_greedy(reference, prompt, NUM_TOKENS) for prompt in PROMPTS]
    assert engine_greedy(engine, PROMPTS, NUM_TOKENS) == expected


# ---------------------------------------------------------------- from GGUF


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "phi3", "gpt2"])
def test_gguf_model_matches_transformers(arch: str, tmp_path, one_torch_thread) -> None:
    path = write_tiny_gguf(tmp_path, arch)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    ).eval()
    engine = Engine(load_model(path, device_map="cpu", dtype="float32").model, EngineConfig(block_size=4))
    prompts = [[p % VOCAB for p in prompt] for prompt in PROMPTS]
    _assert_logits_match(reference, engine, prompts)
    expected_tokens = [reference_greedy(reference, prompt, 8) for prompt in prompts]
    assert engine_greedy(engine, prompts, 8) == expected_tokens


def test_gpt2_checkpoint_without_transformer_prefix(tmp_path, one_torch_thread) -> None:
    """GPT-2's own release stores base-model names (`h.0.attn.c_attn.weight`, `wte.weight`) and the
    old causal-mask buffers (`h.N.attn.bias`); the loader adds the prefix and skips the buffers."""
    from safetensors.torch import load_file, save_file

    reference, _ = _reference_and_engine(*CONFIGS["gpt2"], tmp_path, seed=1)
    state = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in state  # tied, so the loader must tie it back
    renamed = {name.removeprefix("transformer."): tensor for name, tensor in state.items()}
    assert "wte.weight" in renamed and not any(name.startswith("transformer.") for name in renamed)
    renamed["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})

    engine = Engine(load_model(tmp_path, device_map="cpu", dtype="float32").model, EngineConfig(block_size=4))
    _assert_logits_match(reference, engine, PROMPTS)


def test_phi3_longrope_matches_transformers(tmp_path, one_torch_thread) -> None:
    """Short factors for sequences of up to original_max_position_embeddings (16) tokens, long ones
    past it, and the attention factor sqrt(1 + ln(256 / 16) / ln(16)) on cos/sin throughout."""
    values = dict(_DECODER, original_max_position_embeddings=16, rope_scaling={
        "type": "longrope", "short_factor": [1.0, 1.3, 1.7, 2.2], "long_factor": [3.0, 5.0, 9.0, 17.0]})  # fmt: skip
    reference, engine = _reference_and_engine("phi3", values, tmp_path)
    _assert_logits_match(reference, engine, PROMPTS)  # the 19-token prompt is past the limit
    # Greedy only where generation does not cross the limit: transformers' generate recomputes the
    # whole cache with the long factors at that point, the engine keeps the keys it has.
    below, past = [1, 5, 9, 33, 7], PROMPTS[2]
    expected = [reference_greedy(reference, below, 11), reference_greedy(reference, past, NUM_TOKENS)]
    assert engine_greedy(engine, [below], 11) + engine_greedy(engine, [past], NUM_TOKENS) == expected
