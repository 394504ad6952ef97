"""Sliding-window attention end to end: tiny random Mistral (every layer slides) and Gemma 3 (sliding
and global layers mixed, GQA) written by transformers' save_pretrained, compared with transformers
on prompts and generations longer than the window, under chunked prefill and preemption; and the
KV blocks behind the window going back to the pool while a long sequence runs."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import engine_greedy, reference_greedy, run_counting_preemptions
from tokenloom.config import EngineConfig
from tokenloom.engine.engine import Engine
from tokenloom.loading import load_model
from tokenloom.sampling_params import SamplingParams

transformers = pytest.importorskip("transformers")

WINDOW = 8
# lengths 5, 1, 21 and 13: two prompts longer than the window
PROMPTS = [
    [1, 5, 9, 33, 7],
    [2],
    [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23],
    [40, 41, 42, 60, 61, 62, 70, 71, 72, 80, 81, 82, 90],
]
COMMON = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2,
    max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


def _mistral(window: int = WINDOW, num_layers: int = 3):
    config = transformers.MistralConfig(
        **COMMON, num_hidden_layers=num_layers, sliding_window=window, tie_word_embeddings=False
    )
    return transformers.MistralForCausalLM(config).eval()


def _gemma3():
    config = transformers.Gemma3TextConfig(
        **COMMON,
        num_hidden_layers=4,
        head_dim=16,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        query_pre_attn_scalar=24,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
        },
        final_logit_softcapping=3.0,
    )
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # Gemma norms start at zero (weight 1): random ones check the (1 + w)
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module", params=["mistral", "gemma3"])
def tiny(request, tmp_path_factory):
    torch.manual_seed(0)
    model = _mistral() if request.param == "mistral" else _gemma3()
    path = tmp_path_factory.mktemp(f"tiny_{request.param}")
    model.save_pretrained(path)
    return path, model, request.param


def _small_pool(name: str) -> EngineConfig:
    """Too few blocks of 2 for the four sequences at once, so some are preempted. Mistral's 3
    sequences' windows need at most 5 blocks each (8 positions at any offset); Gemma 3 has global
    layers, so nothing is freed and the pool must hold the longest sequence (21 + 32 tokens)."""
    return EngineConfig(block_size=2, num_kv_blocks=12 if name == "mistral" else 32)



def _engine(path, engine_config=None) -> Engine:
    return Engine(load_model(str(path), dtype="float32").model, engine_config)



def test_config_sets_the_windows(tiny):
    path, ref, _ = tiny
    config = _engine(path).model.config
    windows = [config.window_for_layer(i) for i in range(config.num_hidden_layers)]
    # MistralConfig has no layer_types: every layer slides
    layer_types = getattr(ref.config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
    assert windows == [WINDOW if t == "sliding_attention" else None for t in layer_types]
    assert config.max_position_embeddings == 512  # no longer capped at the window


def test_logits_match_transformers(tiny):
    path, ref, _ = tiny
    engine = _engine(path)
    long_prompt = list(range(3, 60))  # several windows long
    prompts = [*PROMPTS, long_prompt]
    for ids, logits in zip(prompts, engine.prompt_logits(prompts)):
        with torch.no_grad():
            expected = ref(torch.tensor([ids])).logits[0]
        assert (expected - logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("policy", ["plain", "chunked-prefill", "preemption"])
def test_greedy_tokens_match_transformers(tiny, policy):
    path, ref, name = tiny
    expected = [reference_greedy(ref, p, 32) for p in PROMPTS]
    engine_config = {
        "plain": EngineConfig(block_size=4),
        "chunked-prefill": EngineConfig(block_size=4, max_num_batched_tokens=5),
        "preemption": _small_pool(name),
    }[policy]
    engine = _engine(path, engine_config)
    assert engine_greedy(engine, PROMPTS, 32) == expected
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_preemption_really_happens_with_a_small_pool(tiny):
    path, _, name = tiny
    engine = _engine(path, _small_pool(name))
    for p in PROMPTS:
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    assert run_counting_preemptions(engine) > 0


def test_long_generation_keeps_its_blocks_bounded_and_matches_transformers(tmp_path):
    window, block_size, num_new = 16, 4, 320
    torch.manual_seed(1)
    ref = _mistral(window=window, num_layers=2)
    ref.save_pretrained(tmp_path)
    prompt = [5, 17, 33, 2, 90, 11, 4, 60, 61, 62]
    expected = reference_greedy(ref, prompt, num_new)

    # 10 blocks hold 40 tokens: the sequence outgrows the pool eightfold
    config = EngineConfig(block_size=block_size, num_kv_blocks=10, max_num_batched_tokens=6)
    engine = _engine(tmp_path, config)
    assert engine.model.config.kv_window == window
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=num_new, ignore_eos=True))
    seq = engine.scheduler.waiting[0]
    # A decode step needs the keys of `window` positions (its own included); any `window`
    # consecutive positions touch at most this many blocks, and the 10-token prompt fewer.
    bound = -(-(window - 1) // block_size) + 1
    most_held = 0
    while engine.has_unfinished():
        out = engine.scheduler.schedule()
        most_held = max(most_held, engine.block_manager.num_held_blocks(seq))  # allocated for the step
        result = engine.runner.step(out)
        engine.scheduler.update(out, result.sampled_token_ids)
        assert engine.block_manager.num_used_blocks == engine.block_manager.num_held_blocks(seq)
        assert most_held <= bound
    assert seq.output_token_ids == expected and len(expected) == num_new
    assert most_held == bound  # the bound is reached, so the assertion above was not idle
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


# ---------------------------------------------------------------- which configs slide


def _config_of(model_type: str, **extra):
    from tokenloom.models.registry import model_class_for

    raw = {**COMMON, "num_hidden_layers": 2, "model_type": model_type, **extra}
    return model_class_for(raw).config_class.from_dict(raw)


def test_a_window_as_long_as_the_context_counts_as_none() -> None:
    """Phi-3.5-style configs carry sliding_window=262144 for a 131072 context: a pool sized for that
    window could never be allocated, and the window never cuts anything."""
    for model_type in ("mistral", "phi3"):
        long = _config_of(model_type, sliding_window=1024, max_position_embeddings=256)
        assert long.kv_window is None and long.window_for_layer(0) is None
        short = _config_of(model_type, sliding_window=16, max_position_embeddings=256)
        assert short.kv_window == 16


def test_phi3_with_a_window_longer_than_the_context_serves_requests(tmp_path) -> None:
    config = transformers.Phi3Config(**COMMON, num_hidden_layers=2, sliding_window=1024)
    transformers.Phi3ForCausalLM(config).save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), None, device_map="cpu")
    engine = Engine(loaded.model, EngineConfig(num_kv_blocks=8, block_size=4))
    engine.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    outputs = [out for out in engine.run() if out.finished]
    assert len(outputs[0].token_ids) == 4


def test_llama_ignores_a_sliding_window_key_as_transformers_does() -> None:
    # transformers' LlamaModel never reads sliding_window; its Mistral never reads layer_types
    assert _config_of("llama", sliding_window=4).kv_window is None
    mistral = _config_of("mistral", sliding_window=4, layer_types=["full_attention", "full_attention"])
    assert [mistral.window_for_layer(i) for i in range(2)] == [4, 4]
