"""Speculative decoding: prompt lookup and a draft model. Greedy output must equal plain greedy decoding
(the oracle: the same engine without speculation), sampled output must follow the target's distribution
(chi-square against the exact probabilities), and stops inside an accepted run must cut it there."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.prompts import GREEDY_PROMPTS
from tests.tiny_models import ARCHS, _decoder_case, write_gguf, write_tiny_gguf
from tokenloom import SamplingParams
from tokenloom.cache.block_manager import BlockManager
from tokenloom.config import EngineConfig
from tokenloom.engine.engine import Engine
from tokenloom.engine.prompt_lookup import prompt_lookup
from tokenloom.engine.scheduler import Scheduler
from tokenloom.engine.sequence import FinishReason, Sequence
from tokenloom.loading import load_model
from tokenloom.speculative_config import SpeculativeConfig

LOOKUP = SpeculativeConfig("prompt_lookup", num_speculative_tokens=4, prompt_lookup_max=3)
DRAFT = SpeculativeConfig("draft_model", num_speculative_tokens=3)
NOISE = 0.05
CONFIG = EngineConfig(block_size=4, num_kv_blocks=512, max_num_seqs=256)


# ---------------------------------------------------------------- prompt lookup (pure Python)


def test_prompt_lookup_proposes_what_followed_the_earliest_longest_match():
    assert prompt_lookup([1, 2, 3, 4, 9, 1, 2, 3, 5, 1, 2, 3], 3) == [4, 9, 1]  # the first "1 2 3"
    assert prompt_lookup([7, 8, 1, 2, 8], 4) == [1, 2, 8]  # only a 1-gram matches; capped by the end
    assert prompt_lookup([1, 2, 3], 4) == []  # nothing repeats
    assert prompt_lookup([5, 5, 5], 2, max_ngram=1) == [5, 5]
    assert prompt_lookup([1, 2, 1, 2], 2, min_ngram=3) == []


def test_speculative_config_validates_with_clear_errors():
    assert SpeculativeConfig("ngram").method == "prompt_lookup"
    with pytest.raises(ValueError, match="method must be one of"):
        SpeculativeConfig("medusa")
    with pytest.raises(ValueError, match=r"num_speculative_tokens must be an integer in \[0, 64\], got -1"):
        SpeculativeConfig(num_speculative_tokens=-1)
    with pytest.raises(ValueError, match=r"prompt_lookup_min \(4\) must not exceed prompt_lookup_max \(3\)"):
        SpeculativeConfig(prompt_lookup_min=4)
    with pytest.raises(ValueError, match="speculative must be a SpeculativeConfig"):
        SamplingParams(speculative={"method": "ngram"})


# ---------------------------------------------------------------- scheduler (pure Python)


def _scheduled_with_proposal(proposed: list[int], max_tokens: int = 10, stop: list[int] | None = None):
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    seq = Sequence("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=max_tokens, stop_token_ids=stop or []), 0)
    sched.add(seq)
    sched.update(sched.schedule(), [4])  # prefill: token 4 sampled
    seq.spec_token_ids = list(proposed)
    out = sched.schedule()
    return sched, seq, out


def test_only_accepted_tokens_count_as_computed():
    sched, seq, out = _scheduled_with_proposal([5, 6, 7])
    (item,) = out.scheduled
    assert (item.num_new_tokens, item.spec_token_ids, item.samples) == (4, [5, 6, 7], True)
    assert len(seq.block_ids) == 2  # slots for positions 3..6
    sched.update(out, [[5, 9]])  # 5 accepted, 6 rejected: the target chose 9 there
    assert seq.token_ids == [1, 2, 3, 4, 5, 9]
    assert seq.num_computed_tokens == 5  # 4 and 5 have KV; 9 is computed next step
    assert seq.spec_token_ids == []


def test_a_stop_inside_an_accepted_run_drops_the_rest():
    sched, seq, out = _scheduled_with_proposal([5, 6, 7], stop=[6])
    sched.update(out, [[5, 6, 7, 8]])
    assert seq.token_ids == [1, 2, 3, 4, 5, 6] and seq.finish_reason is FinishReason.EOS
    sched, seq, out = _scheduled_with_proposal([5, 6, 7], max_tokens=3)
    sched.update(out, [[5, 6, 7, 8]])
    assert seq.output_token_ids == [4, 5, 6] and seq.finish_reason is FinishReason.LENGTH


def test_proposals_never_preempt_and_shrink_to_the_free_blocks():
    bm = BlockManager(num_blocks=2, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    seq = Sequence("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=10), 0)
    sched.add(seq)
    sched.update(sched.schedule(), [4])
    seq.spec_token_ids = [5, 6, 7, 8, 9, 10]  # 7 positions from 3: 10 > the pool's 8
    (item,) = sched.schedule().scheduled
    assert item.spec_token_ids == [5, 6, 7, 8] and not sched.waiting


# ---------------------------------------------------------------- the tiny pair


def _noisy_llama(root: Path) -> Path:
    """The tiny llama with noise on every weight: a draft that agrees with it part of the time."""
    rng = np.random.default_rng(ARCHS.index("llama"))
    kv, tensors = _decoder_case("llama", rng)
    noise = np.random.default_rng(123)
    noisy = {name: (array + NOISE * noise.standard_normal(array.shape), qtype) for name, (array, qtype) in tensors.items()}
    return write_gguf(root / "llama_noisy.gguf", "llama", kv, noisy)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec_tiny")

    def load(path: Path):
        return load_model(path, device_map="cpu", dtype="float32").model

    return load(write_tiny_gguf(root, "llama")), {
        "qwen2": load(write_tiny_gguf(root, "qwen2")), "noisy": load(_noisy_llama(root)),
    }


def _tiny_prompts() -> list[list[int]]:
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 96) for _ in range(rng.randrange(3, 24))] for _ in range(16)]
    return prompts + [[5, 6, 7, 8] * 4, [9, 10] * 6, [11, 12, 13] * 3, [14] * 5]  # 20: some repeat


def _greedy(engine: Engine, prompts: list[list[int]], specs: list[SpeculativeConfig | None], n: int = 40):
    ids = [
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, speculative=s))
        for p, s in zip(prompts, specs)
    ]
    done = {o.request_id: list(o.token_ids) for o in engine.run() if o.finished}
    return [done[i] for i in ids]


@pytest.mark.parametrize("draft", [None, "qwen2", "noisy", "self"])
def test_tiny_greedy_with_speculation_equals_plain_greedy(tiny_pair, draft):
    target, drafts = tiny_pair
    prompts = _tiny_prompts()
    expected = _greedy(Engine(target, CONFIG), prompts, [None] * len(prompts))
    draft_model = None if draft is None else target if draft == "self" else drafts[draft]
    engine = Engine(target, CONFIG, draft_model=draft_model)
    spec = LOOKUP if draft is None else DRAFT
    # every fourth row decodes plainly: rows with and without speculation share each step
    specs = [None if i % 4 == 3 else spec for i in range(len(prompts))]
    assert _greedy(engine, prompts, specs) == expected
    stats = engine.speculative_stats
    assert stats.num_verified_rows > 0
    if draft == "self":
        assert stats.acceptance_rate == 1.0 and stats.mean_accepted_length > 3
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    if engine.speculator.draft is not None:
        assert engine.speculator.draft.block_manager.num_used_blocks == 0


def test_eos_and_max_tokens_inside_an_accepted_run(tiny_pair):
    target, _ = tiny_pair
    prompt = [5, 6, 7, 8, 9]
    (plain,) = _greedy(Engine(target, CONFIG), [prompt], [None], n=12)
    stop_id = plain[6]
    first = plain.index(stop_id)
    params = dict(temperature=0, stop_token_ids=[stop_id], speculative=SpeculativeConfig("draft_model", 5))
    engine = Engine(target, CONFIG, draft_model=target)  # accepts every proposal: runs of 6 tokens
    engine.add_request(prompt, SamplingParams(max_tokens=12, **params))
    out = [o for o in engine.run() if o.finished][0]
    assert list(out.token_ids) == plain[: first + 1] and out.finish_reason == "eos"
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, speculative=DRAFT))
    out = [o for o in engine.run() if o.finished][0]
    assert list(out.token_ids) == plain[:4] and out.finish_reason == "length"


def test_a_draft_model_with_another_vocabulary_is_refused(tiny_pair, tmp_path):
    target, _ = tiny_pair
    other = load_model(write_tiny_gguf(tmp_path, "gpt2"), device_map="cpu", dtype="float32").model
    other.config.vocab_size = 100  # as a model of another tokenizer would have
    with pytest.raises(ValueError, match="draft model's vocabulary has 100 tokens and the target model's 96"):
        Engine(target, CONFIG, draft_model=other)
    with pytest.raises(ValueError, match="'draft_model' needs a draft model"):
        Engine(target, CONFIG).add_request([5, 6], SamplingParams(speculative=DRAFT))


def test_beam_search_with_speculation_is_refused(tiny_pair):
    from tokenloom.engine.beam_search import BeamSearchParams, beam_search

    target, _ = tiny_pair
    params = BeamSearchParams(num_beams=2, max_tokens=4, sampling_params=SamplingParams(temperature=0, speculative=LOOKUP))
    with pytest.raises(ValueError, match="beam search cannot be combined with speculative decoding"):
        beam_search(Engine(target, CONFIG), [[5, 6, 7]], params)


# ---------------------------------------------------------------- sampled: the target's distribution


def _chi_square_p_value(counts: Counter, probs: dict, total: int) -> float:
    """Pearson's test of `counts` against `probs`; cells expecting fewer than 5 are pooled."""
    observed, expected, pool_o, pool_e = [], [], 0.0, 0.0
    for cell, p in probs.items():
        if total * p >= 5:
            observed.append(counts.get(cell, 0))
            expected.append(total * p)
        else:
            pool_o, pool_e = pool_o + counts.get(cell, 0), pool_e + total * p
    if pool_e > 0:
        observed.append(pool_o)
        expected.append(pool_e)
    assert sum(counts.values()) == total and set(counts) <= set(probs)
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    df = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def _top_k_probs(logits: torch.Tensor, k: int) -> dict[int, float]:
    top = logits.double().topk(k)
    return dict(zip(top.indices.tolist(), top.values.softmax(-1).tolist()))


@pytest.mark.parametrize("proposer", ["prompt_lookup", "draft_model"])
def test_sampled_output_follows_the_target_distribution(tiny_pair, proposer):
    """The joint of the first two tokens: the second is the first speculated position (the first comes
    from the prefill). Exact probabilities: top-k 6 of the target's logits, temperature 1."""
    target, drafts = tiny_pair
    num_samples, top_k = 3000, 6
    engine = Engine(target, CONFIG, draft_model=drafts["noisy"])
    # each token followed by the one the target likes best after it alone: prompt lookup (1-grams) then
    # proposes a token the target sometimes accepts
    singles = engine.prompt_logits([[x] for x in range(3, 96)])
    prompt = [t for x, logits in zip(range(3, 96), singles) for t in (x, int(logits[-1].argmax()))]
    first = _top_k_probs(engine.prompt_logits([prompt])[0][-1], top_k)
    seconds = engine.prompt_logits([prompt + [x] for x in first])
    joint = {(x, y): px * py for (x, px), logits in zip(first.items(), seconds)
             for y, py in _top_k_probs(logits[-1], top_k).items()}
    spec = SpeculativeConfig(proposer, num_speculative_tokens=2, prompt_lookup_max=1)
    for seed in range(num_samples):
        engine.add_request(prompt, SamplingParams(temperature=1.0, top_k=top_k, max_tokens=3, ignore_eos=True,
                                                  seed=seed, speculative=spec))
    counts = Counter(tuple(o.token_ids[:2]) for o in engine.run() if o.finished)
    stats = engine.speculative_stats
    assert stats.num_verified_rows > 0.9 * num_samples  # nearly all (the token budget trims a few)
    assert 0 < stats.acceptance_rate < 0.95  # both acceptance and the residual draw are exercised
    assert _chi_square_p_value(counts, joint, num_samples) > 1e-3


# ---------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    from tokenloom import LLM

    llm = LLM(str(smollm2_gguf), dtype="float32")  # the exact mode; the draft is the quantized default
    draft = load_model(smollm2_gguf, device_map="cpu").model
    return llm, draft


@pytest.mark.parametrize("method", ["prompt_lookup", "draft_model"])
def test_smollm2_greedy_with_speculation_equals_plain_greedy(smollm2, method, one_torch_thread):
    llm, draft = smollm2
    prompts = [llm.tokenizer.encode(p) for p in GREEDY_PROMPTS]
    expected = _greedy(llm.engine, prompts, [None] * len(prompts), n=32)
    llm.engine.set_draft_model(draft)
    before = llm.engine.speculative_stats.num_verified_rows
    spec = SpeculativeConfig(method, num_speculative_tokens=4)
    assert _greedy(llm.engine, prompts, [spec] * len(prompts), n=32) == expected
    assert llm.engine.speculative_stats.num_verified_rows > before


def test_smollm2_default_mode_greedy_with_prompt_lookup_equals_plain_greedy(smollm2_gguf, one_torch_thread):
    """In the default (quantized) mode too: each verified position is a row of a decode step, through
    the same fused path and kernels as plain decoding (chunks of at most the kernels' width), so the
    bfloat16 roundings are the same and greedy output is unchanged, for one stream on an edit task and
    for 8 streams at once."""
    from tokenloom import LLM
    from tokenloom.bench.speculative import TASK

    llm = LLM(str(smollm2_gguf))
    spec = SpeculativeConfig("prompt_lookup", num_speculative_tokens=5)
    task = [llm.tokenizer.encode(TASK)]
    expected = _greedy(llm.engine, task, [None], n=128)
    assert _greedy(llm.engine, task, [spec], n=128) == expected
    assert llm.engine.speculative_stats.acceptance_rate > 0.3
    prompts = [llm.tokenizer.encode(p) for p in GREEDY_PROMPTS[:8]]
    expected = _greedy(llm.engine, prompts, [None] * 8, n=32)
    assert _greedy(llm.engine, prompts, [spec] * 8, n=32) == expected


def test_smollm2_stop_string_inside_an_accepted_run(smollm2, one_torch_thread):
    llm, draft = smollm2
    llm.engine.set_draft_model(draft)
    prompt = llm.tokenizer.encode(GREEDY_PROMPTS[1])
    plain = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    stop = plain.text[len(plain.text) // 2 :][:6]
    results = [
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, stop=[stop], speculative=spec))[0]
        for spec in (None, SpeculativeConfig("draft_model", 6))
    ]
    assert results[0].finish_reason == "stop"
    assert (results[1].text, results[1].token_ids) == (results[0].text, results[0].token_ids)


# ---------------------------------------------------------------- transformers' generate() names


@pytest.fixture(scope="module")
def hf_tiny_pair(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from tokenloom import AutoModelForCausalLM

    models = []
    for seed, layers in ((0, 2), (1, 1)):
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(
            vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, eos_token_id=2, pad_token_id=0,
        )
        path = tmp_path_factory.mktemp(f"spec_hf_{seed}")
        transformers.LlamaForCausalLM(config).save_pretrained(path)
        models.append(AutoModelForCausalLM.from_pretrained(str(path)))
    return models


def test_generate_takes_prompt_lookup_num_tokens_and_assistant_model(hf_tiny_pair):
    target, assistant = hf_tiny_pair
    inputs = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11, 9, 10, 11, 9, 10, 11, 9]])
    kwargs = dict(max_new_tokens=16, do_sample=False)
    plain = target.generate(inputs, **kwargs)
    assert torch.equal(target.generate(inputs, prompt_lookup_num_tokens=4, max_matching_ngram_size=3, **kwargs), plain)
    assert torch.equal(target.generate(inputs, assistant_model=assistant, **kwargs), plain)
    assert target.engine.speculative_stats.num_verified_rows > 0
    with pytest.raises(ValueError, match="cannot be combined with beam search"):
        target.generate(inputs, prompt_lookup_num_tokens=4, num_beams=2, max_new_tokens=4)
    with pytest.raises(ValueError, match="cannot be combined with beam search"):
        target.generate(inputs, assistant_model=assistant, num_beams=2, max_new_tokens=4)


def test_the_speculative_l0_and_l1_modules_do_not_import_torch():
    import subprocess
    import sys

    code = "import sys, tokenloom.speculative_config, tokenloom.engine.prompt_lookup; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_speculation_with_the_prefix_cache_equals_plain_greedy(tiny_pair):
    """Only accepted tokens are committed: a second pass over the same prompts hits the cache and
    still decodes the plain greedy tokens."""
    import dataclasses

    target, drafts = tiny_pair
    prompts = _tiny_prompts()
    expected = _greedy(Engine(target, CONFIG), prompts, [None] * len(prompts))
    engine = Engine(target, dataclasses.replace(CONFIG, enable_prefix_caching=True), draft_model=drafts["noisy"])
    for spec in (LOOKUP, DRAFT, LOOKUP):
        assert _greedy(engine, prompts, [spec] * len(prompts)) == expected
