"""Beam search on the engine against transformers' `generate(num_beams=...)` (the oracle), KV blocks
shared between beams (fork and copy-on-write), and parameter validation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tokenloom import AutoModelForCausalLM, EngineConfig, SamplingParams
from tokenloom.cache.block_manager import BlockManager
from tokenloom.cache.kv_cache import KVCache
from tokenloom.engine.beam_search import BeamSearchParams, beam_search
from tokenloom.engine.sequence import FREED_BLOCK, Sequence
from tokenloom.sampling.beam import BeamSettings, BeamState, beam_log_probs, select_beams
from tokenloom.sampling.sampler import SamplingBatch

transformers = pytest.importorskip("transformers")

TINY_PROMPTS = [[1, 5, 9, 33, 7], [2], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41, 42], [60, 61]]
# The random tiny model rarely picks one given id; several stop ids make hypotheses end on EOS.
TINY_EOS = [2, 17, 30, 44]
SMOL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nName three fruits.<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village,",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]
SCORE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    ref = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny_llama_beams")
    ref.save_pretrained(path)
    # Blocks of 4 tokens: prompts end mid-block, so the first write of every beam is a copy-on-write.
    ours = AutoModelForCausalLM.from_pretrained(str(path), dtype="float32", engine_config=EngineConfig(block_size=4))
    return ref, ours


def _reference(model, prompt: list[int], params: BeamSearchParams, pad_token_id: int):
    """transformers' sequences (generated part, padded) and sequences_scores for one prompt alone."""
    ids = torch.tensor([prompt])
    kwargs = {}
    if params.sampling_params.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = params.sampling_params.repetition_penalty
    if params.sampling_params.no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = params.sampling_params.no_repeat_ngram_size
    if params.sampling_params.bad_words_ids:
        kwargs["bad_words_ids"] = params.sampling_params.bad_words_ids
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=params.num_beams,
            num_return_sequences=params.num_return_sequences, length_penalty=params.length_penalty,
            early_stopping=params.early_stopping, max_new_tokens=params.max_tokens,
            min_new_tokens=params.min_tokens, eos_token_id=params.stop_token_ids, pad_token_id=pad_token_id,
            output_scores=True, return_dict_in_generate=True, **kwargs,
        )
    return out.sequences[:, len(prompt):].tolist(), out.sequences_scores.tolist()


def _compare(ref_model, prompts, got, params, pad_token_id) -> float:
    """Asserts equal sequences (ours padded the way transformers pads: with pad_token_id, or the
    first EOS id when that is 0/None) and returns the largest score difference."""
    fill = pad_token_id or params.stop_token_ids[0]
    worst = 0.0
    for prompt, hyps in zip(prompts, got):
        sequences, scores = _reference(ref_model, prompt, params, pad_token_id)
        assert len(hyps) == params.num_return_sequences
        for expected, expected_score, hyp in zip(sequences, scores, hyps):
            assert hyp.token_ids + [fill] * (len(expected) - len(hyp.token_ids)) == expected, (prompt, hyp)
            worst = max(worst, abs(hyp.score - expected_score))
    return worst


TINY_CASES = [
    # num_beams, num_return_sequences, length_penalty, early_stopping, max_tokens, min_tokens
    (2, 1, 1.0, False, 16, 0),
    (2, 2, 1.0, True, 16, 0),
    (4, 3, 1.3, True, 16, 0),
    (4, 2, 0.7, "never", 16, 0),
    (4, 4, -0.5, False, 12, 0),
    (3, 2, 2.0, "never", 14, 0),
    (4, 2, 1.0, False, 14, 6),
]


@pytest.mark.parametrize("case", TINY_CASES, ids=[str(c) for c in TINY_CASES])
def test_tiny_llama_matches_transformers(tiny, case):
    ref, ours = tiny
    num_beams, num_return, length_penalty, early_stopping, max_tokens, min_tokens = case
    params = BeamSearchParams(
        num_beams=num_beams, num_return_sequences=num_return, length_penalty=length_penalty,
        early_stopping=early_stopping, max_tokens=max_tokens, min_tokens=min_tokens, stop_token_ids=TINY_EOS,
    )
    got = beam_search(ours.engine, TINY_PROMPTS, params)  # the 5 prompts in one batch
    assert _compare(ref, TINY_PROMPTS, got, params, pad_token_id=0) <= SCORE_TOLERANCE
    manager = ours.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks
    if min_tokens:
        assert all(len(h.token_ids) >= min_tokens for hyps in got for h in hyps)


@pytest.mark.parametrize(
    "processors",
    [
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(no_repeat_ngram_size=2),
        SamplingParams(bad_words_ids=[[24], [0, 83], [75, 92]], repetition_penalty=0.8),
    ],
    ids=["repetition_penalty", "no_repeat_ngram_size", "bad_words_ids"],
)
def test_tiny_llama_processors_match_transformers(tiny, processors):
    """transformers applies the processors to log-probabilities in beam search (a repetition penalty
    multiplies a negative log-probability); the random model repeats itself a lot, so they bite."""
    ref, ours = tiny
    params = BeamSearchParams(
        num_beams=3, num_return_sequences=2, max_tokens=14, stop_token_ids=TINY_EOS, sampling_params=processors
    )
    plain = beam_search(ours.engine, TINY_PROMPTS, dataclasses.replace(params, sampling_params=SamplingParams()))
    got = beam_search(ours.engine, TINY_PROMPTS, params)
    assert got != plain
    assert _compare(ref, TINY_PROMPTS, got, params, pad_token_id=0) <= SCORE_TOLERANCE


def test_tiny_cases_reach_both_finish_reasons(tiny):
    """The parity cases above are only meaningful if hypotheses end on EOS as well as on length."""
    _, ours = tiny
    params = BeamSearchParams(num_beams=4, num_return_sequences=4, max_tokens=16, stop_token_ids=TINY_EOS)
    reasons = {h.finish_reason for hyps in beam_search(ours.engine, TINY_PROMPTS, params) for h in hyps}
    assert reasons == {"eos", "length"}


@pytest.fixture(scope="module")
def smol(smollm2_gguf, hf_smollm2, one_torch_thread):
    ref, tok = hf_smollm2
    ours = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf), dtype="float32")
    prompts = [tok(p).input_ids for p in SMOL_PROMPTS]
    eos = ref.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    return ref, ours, prompts, eos


SMOL_CASES = [
    # num_beams, num_return_sequences, length_penalty, early_stopping (transformers is the slow side:
    # about 5 s per case here, so two cases; the tiny model covers the other combinations)
    (2, 2, 1.0, True),
    (4, 3, 0.6, False),
]


@pytest.mark.parametrize("case", SMOL_CASES, ids=[str(c) for c in SMOL_CASES])
def test_smollm2_matches_transformers(smol, case):
    ref, ours, prompts, eos = smol
    num_beams, num_return, length_penalty, early_stopping = case
    params = BeamSearchParams(
        num_beams=num_beams, num_return_sequences=num_return, length_penalty=length_penalty,
        early_stopping=early_stopping, max_tokens=12, stop_token_ids=eos,
    )
    got = beam_search(ours.engine, prompts, params)
    worst = _compare(ref, prompts, got, params, pad_token_id=ref.generation_config.pad_token_id)
    assert worst <= SCORE_TOLERANCE, f"largest sequences_scores difference {worst}"


def test_sliding_window_model_matches_transformers(tmp_path):
    """Mistral with a window shorter than the generation: beams free the blocks behind their window
    (shared ones once no beam reaches them) and still decode what transformers decodes."""
    torch.manual_seed(2)
    config = transformers.MistralConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, sliding_window=8, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    ref = transformers.MistralForCausalLM(config).eval()
    ref.save_pretrained(tmp_path)
    ours = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype="float32", engine_config=EngineConfig(block_size=4))
    assert ours.engine.model.config.kv_window == 8
    params = BeamSearchParams(num_beams=3, num_return_sequences=2, max_tokens=16, stop_token_ids=TINY_EOS)
    prompts = [list(range(3, 14)), [5, 6]]
    engine, forward, behind, leaked = ours.engine, ours.engine.runner.forward_hidden, [], []

    def checking_forward(out):
        held = {b for item in out.scheduled for b in item.seq.block_ids if b != FREED_BLOCK}
        leaked.append(engine.block_manager.num_used_blocks - len(held))
        for item in out.scheduled:
            # blocks wholly before the oldest position this beam's query attends (window 8)
            gone = max(0, item.seq.num_computed_tokens - 8 + 1) // 4
            behind.append(sum(b != FREED_BLOCK for b in item.seq.block_ids[:gone]))
        return forward(out)

    engine.runner.forward_hidden = checking_forward
    try:
        got = beam_search(engine, prompts, params)
    finally:
        del engine.runner.forward_hidden
    assert _compare(ref, prompts, got, params, pad_token_id=0) <= SCORE_TOLERANCE
    assert len(behind) > 20 and set(behind) == {0}  # no beam holds a block behind its window
    assert set(leaked) == {0}  # every used block belongs to a running beam
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_beams_share_kv_blocks_and_return_them(tiny):
    ref, ours = tiny
    engine = ours.engine
    manager = engine.block_manager
    prompt = list(range(3, 33))  # 30 tokens: 7 full blocks of 4 and a partial one
    params = BeamSearchParams(num_beams=4, max_tokens=10, stop_token_ids=[2])
    used, copies = [], []
    forward, copy_blocks = engine.runner.forward_hidden, engine.kv_cache.copy_blocks

    def counting_forward(out):
        used.append(manager.num_used_blocks)
        held = {b for item in out.scheduled for b in item.seq.block_ids}
        assert manager.num_used_blocks == len(held)  # every used block belongs to a running beam
        return forward(out)

    def counting_copies(src, dst):
        copies.append(len(src))
        return copy_blocks(src, dst)

    engine.runner.forward_hidden = counting_forward
    engine.kv_cache.copy_blocks = counting_copies
    try:
        got = beam_search(engine, [prompt], params)
    finally:
        del engine.runner.forward_hidden, engine.kv_cache.copy_blocks
    # An unshared beam holding its last computed token (position 30 + 10 - 2) needs 10 blocks.
    unshared = -(-(len(prompt) + params.max_tokens - 1) // manager.block_size)
    assert 1 < len(used) <= params.max_tokens  # the prefill, then at most one forward per further token
    assert max(used) < params.num_beams * unshared
    assert max(used) <= len(prompt) // manager.block_size + params.num_beams * 3  # the 7 prompt blocks shared
    assert sum(copies) > 0  # the partial prompt block was copied on write
    assert manager.num_free_blocks == manager.num_blocks
    assert _compare(ref, [prompt], got, params, pad_token_id=0) <= SCORE_TOLERANCE


def test_blocks_come_back_when_the_model_fails(tiny):
    _, ours = tiny
    engine = ours.engine
    calls = []

    def failing_forward(out):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return type(engine.runner).forward_hidden(engine.runner, out)

    engine.runner.forward_hidden = failing_forward
    try:
        with pytest.raises(RuntimeError, match="boom"):
            beam_search(engine, TINY_PROMPTS, BeamSearchParams(num_beams=3, max_tokens=8))
    finally:
        del engine.runner.forward_hidden
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_needs_an_idle_engine(tiny):
    _, ours = tiny
    engine = ours.engine
    request_id = engine.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=4))
    try:
        with pytest.raises(RuntimeError, match="idle engine"):
            beam_search(engine, [[1, 2]], BeamSearchParams(num_beams=2))
    finally:
        engine.abort(request_id)


def test_prompt_ids_are_checked(tiny):
    _, ours = tiny
    with pytest.raises(ValueError, match=r"prompt 1.*\[0, 97\)"):
        beam_search(ours.engine, [[1, 2], [5, 97]], BeamSearchParams(num_beams=2))
    with pytest.raises(ValueError, match="prompt 0 must contain at least one token"):
        beam_search(ours.engine, [[]], BeamSearchParams(num_beams=2))


def test_a_pool_too_small_for_the_beams_is_a_clear_error(tiny, tmp_path):
    ref, _ = tiny
    ref.save_pretrained(tmp_path)
    small = AutoModelForCausalLM.from_pretrained(str(tmp_path), engine_config=EngineConfig(block_size=4, num_kv_blocks=6))
    with pytest.raises(ValueError, match="num_kv_blocks"):
        beam_search(small.engine, [list(range(3, 20))], BeamSearchParams(num_beams=4, max_tokens=8))
    assert small.engine.block_manager.num_free_blocks == 6


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_beams", 0, r"num_beams must be >= 1, got 0"),
        ("num_beams", 2.0, r"num_beams must be >= 1, got 2.0"),
        ("length_penalty", float("nan"), r"length_penalty must be a finite number, got nan"),
        ("length_penalty", "1", r"length_penalty must be a finite number, got '1'"),
        ("early_stopping", "always", r"early_stopping must be True, False or 'never', got 'always'"),
        ("early_stopping", 1, r"early_stopping must be True, False or 'never', got 1"),
        ("num_return_sequences", 5, r"num_return_sequences must be in \[1, num_beams=4\], got 5"),
        ("num_return_sequences", 0, r"num_return_sequences must be in \[1, num_beams=4\], got 0"),
        ("max_tokens", 0, r"max_tokens must be >= 1, got 0"),
        ("min_tokens", 17, r"min_tokens must be in \[0, max_tokens=16\], got 17"),
        ("min_tokens", -1, r"min_tokens must be in \[0, max_tokens=16\], got -1"),
        ("stop_token_ids", [2, -3], r"stop_token_ids must be integers >= 0, got -3"),
        ("sampling_params", {"repetition_penalty": 1.2}, r"sampling_params must be a SamplingParams, got dict"),
    ],
)
def test_bad_parameters_are_rejected(field, value, message):
    with pytest.raises(ValueError, match=message):
        BeamSearchParams(**{"num_beams": 4, "max_tokens": 16, field: value})


# ---- per-step scores, logits and beam_indices (compat generate, return_dict_in_generate) ----------


def _beam_outputs(model, ids, mask, ours: bool, **kwargs):
    kwargs = dict(do_sample=False, return_dict_in_generate=True, output_scores=True, output_logits=True, **kwargs)
    if ours:
        return model.generate(ids, attention_mask=mask, **kwargs)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **kwargs)


def _assert_steps_equal(got, ref, live_steps: list[int], num_beams: int, tolerance: float) -> None:
    """Per step, each prompt's block of num_beams rows equals transformers' while that prompt searches
    (the -inf entries where a processor banned a token included), and holds zeros after it ended
    (transformers runs a finished prompt's beams on with the batch; tokenloom drops it)."""
    assert len(got) == len(ref) == max(live_steps)
    for t, (g, r) in enumerate(zip(got, ref)):
        assert g.shape == r.shape and g.dtype == torch.float32
        for p, live in enumerate(live_steps):
            rows = slice(p * num_beams, (p + 1) * num_beams)
            if t >= live:
                assert not g[rows].any(), (t, p)
                continue
            finite = torch.isfinite(r[rows])
            assert torch.equal(finite, torch.isfinite(g[rows])), (t, p)
            assert (g[rows][finite] - r[rows][finite]).abs().max().item() <= tolerance, (t, p)


def _live_steps(got, batch: int, num_beams: int) -> list[int]:
    return [
        sum(bool(step[p * num_beams : (p + 1) * num_beams].any()) for step in got.scores) for p in range(batch)
    ]


BEAM_OUTPUT_CASES = [
    # num_beams, num_return_sequences, length_penalty, early_stopping, extra processors, a prompt of the
    # batch ends before the other
    (3, 2, 1.0, False, {"repetition_penalty": 1.3}, True),
    (4, 3, 0.7, True, {"bad_words_ids": [[24], [75, 92]]}, False),
]
# (no_repeat_ngram_size is left out: transformers counts the left padding of a batch into the n-grams.)


@pytest.mark.parametrize("case", BEAM_OUTPUT_CASES, ids=[str(c[:4]) for c in BEAM_OUTPUT_CASES])
def test_tiny_llama_beam_scores_logits_and_indices_match_transformers(tiny, case):
    """One prompt alone, then a left-padded batch of two whose prompts end at different steps."""
    ref, ours = tiny
    num_beams, num_return, length_penalty, early_stopping, extra, ends_early = case
    kwargs = dict(
        num_beams=num_beams, num_return_sequences=num_return, length_penalty=length_penalty,
        early_stopping=early_stopping, max_new_tokens=14, eos_token_id=TINY_EOS, pad_token_id=0, **extra,
    )
    ended_early = False
    for prompts in ([[1, 5, 9, 33, 7]], [[3, 4, 5, 6, 7, 8, 9], [0, 0, 0, 0, 40, 41, 42]]):
        ids = torch.tensor(prompts)
        mask = (ids != 0).long()
        expected = _beam_outputs(ref, ids, mask, ours=False, **kwargs)
        got = _beam_outputs(ours, ids, mask, ours=True, **kwargs)
        assert list(got.keys()) == [k for k in expected.keys() if k != "past_key_values" and k != "cache"]
        assert torch.equal(got.sequences, expected.sequences)
        assert torch.allclose(got.sequences_scores, expected.sequences_scores, atol=SCORE_TOLERANCE)
        assert got.beam_indices.dtype == expected.beam_indices.dtype
        assert torch.equal(got.beam_indices, expected.beam_indices)
        live = _live_steps(got, len(prompts), num_beams)
        ended_early |= min(live) < max(live)
        _assert_steps_equal(got.scores, expected.scores, live, num_beams, SCORE_TOLERANCE)
        _assert_steps_equal(got.logits, expected.logits, live, num_beams, SCORE_TOLERANCE)
    assert ended_early == ends_early  # the zero-filled steps were exercised


def test_beam_outputs_only_when_asked(tiny):
    """As transformers: without output_scores no sequences_scores, beam_indices always with beams, and
    without return_dict_in_generate just the sequences."""
    ref, ours = tiny
    ids = torch.tensor([[1, 5, 9, 33, 7]])
    kwargs = dict(num_beams=2, max_new_tokens=6, eos_token_id=TINY_EOS, pad_token_id=0, do_sample=False)
    got = ours.generate(ids, return_dict_in_generate=True, **kwargs)
    with torch.no_grad():
        expected = ref.generate(ids, return_dict_in_generate=True, **kwargs)
    assert list(got.keys()) == ["sequences", "beam_indices"]
    assert expected.sequences_scores is None and expected.scores is None
    assert torch.equal(got.beam_indices, expected.beam_indices)
    assert torch.equal(ours.generate(ids, output_scores=True, **kwargs), got.sequences)
    params = BeamSearchParams(num_beams=2, max_tokens=6, stop_token_ids=TINY_EOS)
    (hyp,) = beam_search(ours.engine, [[1, 5, 9, 33, 7]], params)[0]
    assert hyp.step_scores is None and hyp.step_logits is None
    assert len(hyp.beam_indices) == len(hyp.token_ids)


def test_beam_step_scores_of_the_library_api(tiny):
    """beam_search with output_scores / output_logits: per step [num_beams, vocab], one list shared by
    a prompt's hypotheses; the chosen tokens' processed log-probabilities add up to the hypothesis'
    score (length penalty 1, so score * length is the sum)."""
    _, ours = tiny
    params = BeamSearchParams(
        num_beams=3, num_return_sequences=3, max_tokens=10, stop_token_ids=TINY_EOS, output_scores=True,
        output_logits=True,
    )
    hyps = beam_search(ours.engine, [[1, 5, 9, 33, 7], [60, 61]], params)
    for per_prompt in hyps:
        assert all(h.step_scores is per_prompt[0].step_scores for h in per_prompt)
        for h in per_prompt:
            assert len(h.step_scores) == len(h.step_logits) >= len(h.token_ids)
            assert h.step_scores[0].shape == (3, 97)
            total = sum(h.step_scores[t][beam, token].item() for t, (beam, token) in
                        enumerate(zip(h.beam_indices, h.token_ids)))
            assert total / len(h.token_ids) == pytest.approx(h.score, abs=1e-4)
    with pytest.raises(ValueError, match="output_scores must be True or False, got 1"):
        BeamSearchParams(output_scores=1)


# ---- the tensor layer: scoring and selection on hand-built distributions ---------------------------


def test_select_beams_on_a_hand_built_distribution():
    """Two prompts, two beams, vocab 4, stop id 3. Prompt 0 at step 0 (only beam 0 may extend): its best
    candidate is the stop id, a hypothesis scored log p / 1; the next two run on. Prompt 1 at its limit
    (max_new 1): every candidate stops, the prompt is done."""
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 2 + [[0.2, 0.3, 0.4, 0.1]] * 2)  # [2 prompts * 2 beams, 4]
    state = BeamState.start(torch.tensor([5, 1]), torch.tensor([3]), num_beams=2)
    settings = BeamSettings(num_beams=2, beams_to_keep=4, length_penalty=1.0, early_stopping=False)
    state, choice = select_beams(probs.log(), state, settings)
    assert choice.parents[0].tolist() == [0, 0, 0, 0]  # beam 1 starts dead
    assert choice.tokens.tolist() == [[3, 2, 1, 0], [2, 1, 0, 3]]
    assert choice.next_beams[0].tolist() == [1, 2]  # candidates 1 and 2 (tokens 2, 1) run on
    assert state.running_scores[0].tolist() == pytest.approx([math.log(0.3), math.log(0.2)])
    assert choice.finished_slots[0, 0].item() == 2  # candidate 0 (2 finished slots come first)
    assert choice.finished_scores[0, 0].item() == pytest.approx(math.log(0.4))
    assert choice.keep.tolist() == [True, False]
    assert state.keep_rows(choice.keep).running_scores.shape == (1, 2) and state.step == 1
    packed = choice.packed()
    assert packed.shape == (2, 2 * 4 + 3 * 2 + 1) and packed.dtype == torch.float64
    # the processors act on log-probabilities: a banned token is -inf after the log-softmax
    batch = SamplingBatch.build(
        [SamplingParams(bad_words_ids=[[1]])] * 2, [[5, 6]] * 2, [2, 2], [None, None], torch.device("cpu"), 4
    )
    scores = beam_log_probs(torch.zeros(2, 4), batch)
    assert scores[:, 1].tolist() == [float("-inf")] * 2
    assert scores[:, 0].tolist() == pytest.approx([math.log(0.25)] * 2)


# ---- the pure layer: fork, copy-on-write, free ------------------------------------------------


def _seq(name: str, num_tokens: int) -> Sequence:
    return Sequence(name, list(range(1, num_tokens + 1)), SamplingParams(), 0)


def test_fork_shares_blocks_and_counts_references():
    manager = BlockManager(num_blocks=8, block_size=4)
    parent = _seq("p", 6)
    manager.allocate(parent, 6)
    parent.num_computed_tokens = 6
    child = _seq("c", 6)
    manager.fork(parent, child)
    assert child.block_ids == parent.block_ids
    assert [manager.ref_count(b) for b in parent.block_ids] == [2, 2]
    assert manager.num_used_blocks == 2
    with pytest.raises(ValueError, match="already holds blocks"):
        manager.fork(parent, child)
    manager.free(parent)
    assert [manager.ref_count(b) for b in child.block_ids] == [1, 1]
    assert manager.num_used_blocks == 2
    manager.free(child)
    assert manager.num_free_blocks == 8


def test_copy_on_write_copies_only_the_shared_block_written():
    manager = BlockManager(num_blocks=8, block_size=4)
    parent = _seq("p", 6)
    manager.allocate(parent, 6)
    parent.num_computed_tokens = 6
    children = [_seq(f"c{i}", 6) for i in range(2)]
    for child in children:
        manager.fork(parent, child)
        child.token_ids.append(9)
        child.num_computed_tokens = 6
    full, partial = parent.block_ids
    manager.free(parent)  # the children continue it, as beams do
    assert manager.num_shared_blocks_to_write(children[0], 1) == 1
    first = manager.copy_on_write(children[0], 1)  # position 6 lands in the shared partial block
    assert len(first) == 1 and first[0][0] == partial and first[0][1] not in (full, partial)
    assert children[0].block_ids == [full, first[0][1]]
    assert manager.ref_count(partial) == 1
    assert manager.copy_on_write(children[1], 1) == []  # the last holder writes in place
    assert children[1].block_ids == [full, partial]
    assert manager.ref_count(full) == 2  # the full block is never written again: still shared
    for child in children:
        manager.free(child)
    assert manager.num_free_blocks == 8


def test_copy_on_write_at_a_block_boundary_copies_nothing():
    manager = BlockManager(num_blocks=4, block_size=4)
    parent = _seq("p", 8)
    manager.allocate(parent, 8)
    parent.num_computed_tokens = 8
    child = _seq("c", 8)
    manager.fork(parent, child)
    child.token_ids.append(5)
    child.num_computed_tokens = 8
    assert manager.copy_on_write(child, 1) == []  # position 8 starts a new block
    manager.allocate(child, 1)
    assert len(child.block_ids) == 3 and manager.ref_count(child.block_ids[2]) == 1
    manager.free(parent)
    manager.free(child)
    assert manager.num_free_blocks == 4


def test_copy_on_write_without_free_blocks_changes_nothing():
    manager = BlockManager(num_blocks=2, block_size=4)
    parent = _seq("p", 6)
    manager.allocate(parent, 6)
    parent.num_computed_tokens = 6
    child = _seq("c", 6)
    manager.fork(parent, child)
    before = list(child.block_ids)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        manager.copy_on_write(child, 1)
    assert child.block_ids == before and manager.ref_count(before[1]) == 2


def test_fork_keeps_freed_window_entries():
    manager = BlockManager(num_blocks=8, block_size=4)
    parent = _seq("p", 12)
    manager.allocate(parent, 12)
    parent.num_computed_tokens = 12
    manager.free_blocks_before(parent, 8)
    child = _seq("c", 12)
    manager.fork(parent, child)
    assert child.block_ids[:2] == [FREED_BLOCK, FREED_BLOCK]
    assert manager.ref_count(child.block_ids[2]) == 2
    manager.free(parent)
    manager.free(child)
    assert manager.num_free_blocks == 8


def test_kv_cache_copy_blocks_copies_every_layer():
    cache = KVCache(2, num_blocks=4, block_size=3, num_kv_heads=2, head_dim=5, dtype=torch.float32,
                    device=torch.device("cpu"))
    for pool in (*cache.keys, *cache.values):
        pool.copy_(torch.randn_like(pool))
    before = [pool.clone() for pool in (*cache.keys, *cache.values)]
    cache.copy_blocks([1, 3], [2, 0])
    for old, new in zip(before, (*cache.keys, *cache.values)):
        blocks_old, blocks_new = old.view(-1, 3, 2, 5), new.view(-1, 3, 2, 5)  # + the scratch block
        assert torch.equal(blocks_new[2], blocks_old[1]) and torch.equal(blocks_new[0], blocks_old[3])
        assert torch.equal(blocks_new[1], blocks_old[1]) and torch.equal(blocks_new[3], blocks_old[3])
    with pytest.raises(ValueError, match="as many sources as destinations"):
        cache.copy_blocks([1], [])
