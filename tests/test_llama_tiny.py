"""A tiny random Llama with grouped-query attention, written by transformers' save_pretrained:
parity with transformers, and engine paths (chunked prefill, preemption, batching) that must not
change the tokens."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.tiny_models import engine_greedy, reference_greedy, run_counting_preemptions
from tokenloom import AutoModelForCausalLM, EngineConfig, SamplingParams
from tokenloom.errors import ModelNotFoundError, UnsupportedModelError

transformers = pytest.importorskip("transformers")

PROMPTS = [[1, 5, 9, 33, 7], [2], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [40, 41, 42]]


def _tiny_config(**overrides):
    values = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    values.update(overrides)
    return transformers.LlamaConfig(**values)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_tiny_config()).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return path, model




def test_logits_match_transformers(tiny_dir):
    path, ref = tiny_dir
    ours = AutoModelForCausalLM.from_pretrained(str(path), dtype="float32")
    for ids, logits in zip(PROMPTS, ours.engine.prompt_logits(PROMPTS)):
        with torch.no_grad():
            expected = ref(torch.tensor([ids])).logits[0]
        assert (expected - logits).abs().max().item() <= 1e-4


def test_greedy_tokens_match_transformers(tiny_dir):
    path, ref = tiny_dir
    ours = AutoModelForCausalLM.from_pretrained(str(path), dtype="float32")
    expected = [reference_greedy(ref, p, 32) for p in PROMPTS]
    assert engine_greedy(ours.engine, PROMPTS, 32) == expected


@pytest.mark.parametrize(
    "engine_config",
    [
        EngineConfig(block_size=4, max_num_batched_tokens=5),  # prompts prefilled in chunks
        EngineConfig(block_size=2, num_kv_blocks=24),  # too few blocks: sequences are preempted
        EngineConfig(block_size=16, max_num_seqs=1),  # one sequence at a time
    ],
    ids=["chunked-prefill", "preemption", "one-at-a-time"],
)
def test_engine_policies_do_not_change_tokens(tiny_dir, engine_config):
    path, ref = tiny_dir
    expected = [reference_greedy(ref, p, 20) for p in PROMPTS]
    ours = AutoModelForCausalLM.from_pretrained(str(path), dtype="float32", engine_config=engine_config)
    assert engine_greedy(ours.engine, PROMPTS, 20) == expected
    assert ours.engine.block_manager.num_free_blocks == ours.engine.block_manager.num_blocks


def test_preemption_really_happens_with_a_small_pool(tiny_dir):
    path, _ = tiny_dir
    ours = AutoModelForCausalLM.from_pretrained(str(path), engine_config=EngineConfig(block_size=2, num_kv_blocks=24))
    engine = ours.engine
    for p in PROMPTS:
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert run_counting_preemptions(engine) > 0


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    torch.manual_seed(1)
    config = _tiny_config(
        max_position_embeddings=512,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
    )
    ref = transformers.LlamaForCausalLM(config).eval()
    ref.save_pretrained(tmp_path)
    ours = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    prompt = list(range(3, 90))
    with torch.no_grad():
        expected = ref(torch.tensor([prompt])).logits[0]
    assert (ours.engine.prompt_logits([prompt])[0] - expected).abs().max().item() <= 1e-4


def test_unknown_model_type_is_a_clear_error(tiny_dir, tmp_path):
    path, _ = tiny_dir
    copy = tmp_path / "weird"
    shutil.copytree(path, copy)
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = "weirdformer"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="'weirdformer' is not supported.*llama"):
        AutoModelForCausalLM.from_pretrained(str(copy))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "no-such-model"))


def test_abort_releases_the_request(tiny_dir):
    path, _ = tiny_dir
    ours = AutoModelForCausalLM.from_pretrained(str(path))
    engine = ours.engine
    rid = engine.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    engine.step()
    engine.abort(rid)
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
