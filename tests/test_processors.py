"""Every logits processor and warper against transformers' own, per row.

The oracle is the processor list transformers' `generate()` builds (`_get_logits_processor` on a
tiny model, so the order is transformers' too), run row by row with each row's settings on that
row's prompt + generated tokens. tokenloom runs all rows at once with their different settings.
Presence/frequency penalties (not in transformers) are checked against a direct calculation.
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from tests.tiny_models import run_counting_preemptions
from tokenloom.sampling.processors import ngram_bans_for_row
from tokenloom.sampling.sampler import SamplingBatch, process_logits, sample
from tokenloom.sampling_params import SamplingParams

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    LogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

VOCAB = 128
HISTORY_IDS = 16  # histories draw from few ids, so that tokens, n-grams and bad-word prefixes repeat
STOP = 7
CPU = torch.device("cpu")
MAX_DIFF: dict[str, float] = {}  # the largest |ours - transformers| over the kept entries, per test


@pytest.fixture(scope="module")
def tiny_model():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1,
    )
    return transformers.LlamaForCausalLM(config)


def hf_processors(model, p: SamplingParams, prompt_len: int):
    """The LogitsProcessorList transformers' generate() builds for these settings."""
    warpers = {} if p.is_greedy else {  # transformers ignores them in greedy decoding (and warns)
        "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p, "min_p": p.min_p or None,
        "typical_p": p.typical_p, "epsilon_cutoff": p.epsilon_cutoff, "eta_cutoff": p.eta_cutoff,
    }
    config = transformers.GenerationConfig(
        do_sample=not p.is_greedy,
        repetition_penalty=p.repetition_penalty,
        no_repeat_ngram_size=p.no_repeat_ngram_size or None,
        bad_words_ids=p.bad_words_ids or None,
        sequence_bias=p.sequence_bias or None,
        suppress_tokens=p.suppress_tokens or None,
        begin_suppress_tokens=p.begin_suppress_tokens or None,
        min_new_tokens=p.min_tokens or None,
        renormalize_logits=p.renormalize_logits,
        **warpers,
    )
    config._eos_token_tensor = torch.tensor(p.stop_token_ids) if p.stop_token_ids else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model._get_logits_processor(
            generation_config=config, input_ids_seq_length=prompt_len,
            encoder_input_ids=torch.zeros((1, prompt_len), dtype=torch.long), device="cpu", model_kwargs={},
        )


class DirectPresenceFrequency(LogitsProcessor):
    """logit -= frequency * count + presence * (count > 0) over the generated tokens (OpenAI)."""

    def __init__(self, p: SamplingParams, prompt_len: int) -> None:
        self.p, self.prompt_len = p, prompt_len

    def __call__(self, input_ids, scores):
        counts = torch.bincount(input_ids[0, self.prompt_len :], minlength=scores.shape[-1]).float()
        return scores - self.p.frequency_penalty * counts - self.p.presence_penalty * (counts > 0).float()


def oracle(model, p: SamplingParams, token_ids: list[int], prompt_len: int, logits_row: torch.Tensor):
    chain = hf_processors(model, p, prompt_len)
    if p.presence_penalty or p.frequency_penalty:
        # tokenloom applies them right after the repetition penalty (vLLM's order)
        first = (SequenceBiasLogitsProcessor, RepetitionPenaltyLogitsProcessor)
        chain.insert(sum(isinstance(x, first) for x in chain), DirectPresenceFrequency(p, prompt_len))
    return chain(torch.tensor([token_ids]), logits_row[None].clone())[0]


def histories(rows: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """Random prompt + generated ids with different prompt and output lengths (some outputs empty)."""
    rng = random.Random(seed)
    token_ids, prompt_lens = [], []
    for row in range(rows):
        prompt_len = rng.randint(1, 12)
        num_out = 0 if row % 3 == 0 else rng.randint(1, 20)
        token_ids.append([rng.randrange(HISTORY_IDS) for _ in range(prompt_len + num_out)])
        prompt_lens.append(prompt_len)
    return token_ids, prompt_lens


def random_logits(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def build(params, token_ids, prompt_lens, seed: int = 0) -> SamplingBatch:
    generators = [None if p.is_greedy else torch.Generator().manual_seed(seed + i) for i, p in enumerate(params)]
    return SamplingBatch.build(params, token_ids, prompt_lens, generators, CPU)


def assert_same_filtering(ours: torch.Tensor, ref: torch.Tensor, label: str = "") -> None:
    """Same -inf pattern (same kept set) and the kept values equal to 1e-6."""
    assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (
        f"{label}: kept sets differ, ours {(~torch.isinf(ours)).sum().item()} tokens, "
        f"transformers {(~torch.isinf(ref)).sum().item()}"
    )
    finite = ~torch.isinf(ref)
    diff = (ours[finite] - ref[finite]).abs().max().item() if finite.any() else 0.0
    MAX_DIFF[label] = max(MAX_DIFF.get(label, 0.0), diff)
    assert diff <= 1e-6, f"{label}: max difference {diff}"


def check_against_transformers(model, params: list[SamplingParams], seed: int, label: str) -> torch.Tensor:
    token_ids, prompt_lens = histories(len(params), seed)
    logits = random_logits(len(params), seed)
    out = process_logits(logits.clone(), build(params, token_ids, prompt_lens))
    for row, p in enumerate(params):
        ref = oracle(model, p, token_ids[row], prompt_lens[row], logits[row])
        assert_same_filtering(out[row], ref, f"{label} row {row}")
        if not hf_processors(model, p, prompt_lens[row]):
            assert torch.equal(out[row], logits[row])  # a neutral row is left bit-identical
        # row by row: the batch does not change a row's result
        alone = process_logits(logits[row : row + 1].clone(), build([p], token_ids[row : row + 1], prompt_lens[row : row + 1]))
        assert torch.equal(alone[0], out[row])
    return out


def with_history(seed: int) -> tuple[list[list[int]], list[int]]:
    return histories(8, seed)


# ---------------------------------------------------------------- one knob at a time, per row


KNOBS = {
    "repetition_penalty": [1.0, 1.2, 0.8, 2.0, 1.05, 0.5, 1.0, 3.0],
    "no_repeat_ngram_size": [0, 1, 2, 3, 4, 2, 5, 0],
    "suppress_tokens": [[], [1, 2, 3], [STOP], list(range(0, VOCAB, 3)), [], [5], [127], [0, 1]],
    "begin_suppress_tokens": [[], [1, 2, 3], [4], [5, 6], [], [9], [0], [10, 11]],
    "min_tokens": [0, 1, 2, 5, 30, 40, 3, 10],
    "temperature": [0.0, 0.1, 0.5, 0.7, 1.0, 1.3, 2.0, 0.0],
    "top_k": [0, 1, 2, 5, 50, VOCAB - 1, VOCAB + 10, 3],
    "top_p": [1.0, 0.99, 0.9, 0.75, 0.5, 0.2, 0.05, 1e-6],
    "min_p": [0.0, 0.01, 0.05, 0.1, 0.3, 0.9, 1.0, 0.2],
    "typical_p": [1.0, 0.99, 0.9, 0.5, 0.2, 0.05, 1e-6, 0.7],
    "epsilon_cutoff": [0.0, 1e-4, 3e-4, 1e-3, 0.01, 0.05, 0.2, 0.5],
    "eta_cutoff": [0.0, 1e-4, 4e-3, 0.01, 0.05, 0.2, 0.5, 0.9],
    "renormalize_logits": [False, True, False, True, True, False, False, True],
}


@pytest.mark.parametrize("knob", sorted(KNOBS))
def test_each_knob_per_row_matches_transformers(tiny_model, knob):
    values = KNOBS[knob]
    for seed in range(3):
        # alternate sampling and greedy rows: the warpers must leave greedy rows alone
        params = []
        for row, value in enumerate(values):
            settings = {"temperature": 0.0 if row % 4 == 3 else 1.0, "max_tokens": 50, "stop_token_ids": [STOP, 9]}
            settings[knob] = value
            params.append(SamplingParams(**settings))
        check_against_transformers(tiny_model, params, seed, f"{knob} seed {seed}")


def test_bad_words_and_sequence_bias_match_transformers(tiny_model):
    token_ids, prompt_lens = with_history(11)
    params = []
    for row, ids in enumerate(token_ids):
        words = [
            [ids[-1], 100 + row],  # prefix matches the end: 100+row is banned
            [ids[-2], ids[-1], 50],  # a two-token prefix that matches
            [ids[-1] + 1 if ids[-1] + 1 != ids[-1] else 0, 60],  # a prefix that does not match
            [70 + row],  # single-token words are always banned
            [STOP],  # ... except an EOS id, which transformers leaves alone
            list(range(30, 30 + len(ids) + 2)),  # longer than the whole context: ignored
        ]
        bias = {
            (20 + row,): 2.5,
            (ids[-1], 21): -1.5,  # matches
            (ids[-1], ids[-1], 22): 4.0,  # matches only if the last two ids are equal
            (99, 21): 3.0,  # does not match
            (21,): 0.25,  # adds to the matched two-token bias on the same token
        }
        params.append(
            SamplingParams(temperature=0.0 if row % 2 else 0.8, stop_token_ids=[STOP],
                           bad_words_ids=words if row != 5 else [], sequence_bias=bias if row != 6 else {})
        )
    logits = random_logits(len(params), 11)
    out = process_logits(logits.clone(), build(params, token_ids, prompt_lens))
    for row, p in enumerate(params):
        ref = oracle(tiny_model, p, token_ids[row], prompt_lens[row], logits[row])
        assert_same_filtering(out[row], ref, f"bad words row {row}")
        if row != 5:
            assert torch.isinf(out[row, 100 + row]) and torch.isinf(out[row, 50]) and torch.isinf(out[row, 70 + row])
            assert not torch.isinf(out[row, STOP]) and not torch.isinf(out[row, 60])


def test_presence_and_frequency_penalties_match_a_direct_calculation():
    token_ids, prompt_lens = with_history(12)
    settings = [(0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (1.5, -0.7), (-2.0, 2.0), (2.0, 2.0), (0.0, 0.0), (0.3, 1.1)]
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0, presence_penalty=pp, frequency_penalty=fp)
              for i, (pp, fp) in enumerate(settings)]
    logits = random_logits(len(params), 12)
    out = process_logits(logits.clone(), build(params, token_ids, prompt_lens))
    for row, (presence, frequency) in enumerate(settings):
        expected = logits[row].clone()
        generated = token_ids[row][prompt_lens[row] :]
        for token in set(generated):
            expected[token] -= frequency * generated.count(token) + presence
        assert (out[row] - expected).abs().max().item() <= 1e-6
        if not generated or (presence, frequency) == (0.0, 0.0):
            assert torch.equal(out[row], logits[row])  # prompt tokens are not penalized
    assert any(token_ids[r][prompt_lens[r]:] for r in (1, 2, 3))  # some rows really generated tokens


# ---------------------------------------------------------------- everything at once


def random_params(rng: random.Random, row: int) -> SamplingParams:
    greedy = row % 3 == 0
    return SamplingParams(
        temperature=0.0 if greedy else rng.choice([0.6, 1.0, 1.4]),
        top_k=rng.choice([0, 0, 5, 40]),
        top_p=rng.choice([1.0, 0.9, 0.6]),
        min_p=rng.choice([0.0, 0.0, 0.05]),
        typical_p=rng.choice([1.0, 1.0, 0.9]),
        epsilon_cutoff=rng.choice([0.0, 0.0, 3e-4]),
        eta_cutoff=rng.choice([0.0, 0.0, 1e-3]),
        repetition_penalty=rng.choice([1.0, 1.3, 0.9]),
        presence_penalty=rng.choice([0.0, 0.4]),
        frequency_penalty=rng.choice([0.0, 0.3]),
        no_repeat_ngram_size=rng.choice([0, 0, 2, 3]),
        bad_words_ids=rng.choice([[], [[3], [4, 5]], [[STOP], [1, 2, 3]]]),
        sequence_bias=rng.choice([{}, {(6,): 1.5, (1, 8): -2.0}]),
        suppress_tokens=rng.choice([[], [10, 11]]),
        begin_suppress_tokens=rng.choice([[], [12]]),
        min_tokens=rng.choice([0, 0, 4]),
        max_tokens=50,
        stop_token_ids=[STOP],
        renormalize_logits=rng.choice([False, False, True]),
    )


@pytest.mark.parametrize("seed", range(6))
def test_all_processors_together_match_transformers_row_by_row(tiny_model, seed):
    rng = random.Random(seed)
    params = [random_params(rng, row) for row in range(8)]
    out = check_against_transformers(tiny_model, params, 100 + seed, f"chain seed {seed}")
    # greedy rows pick the argmax of the processed scores, as transformers' greedy decoding does
    token_ids, prompt_lens = histories(len(params), 100 + seed)
    batch = build(params, token_ids, prompt_lens)
    picked = sample(random_logits(len(params), 100 + seed), batch)
    for row, p in enumerate(params):
        if p.is_greedy:
            assert picked[row] == out[row].argmax()
        else:
            assert not torch.isinf(out[row, picked[row]])  # a sampled token was kept by every filter


def test_processors_change_greedy_choices():
    """transformers applies the processors (not the warpers) to greedy decoding: a repetition
    penalty moves the greedy choice away from a seen token, top_k does not touch a greedy row."""
    logits = torch.zeros(2, VOCAB)
    logits[:, 5] = 2.0  # the argmax, and already in the history
    logits[:, 6] = 1.9
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.2), SamplingParams(temperature=0.0, top_k=1)]
    batch = build(params, [[1, 5], [1, 5]], [1, 1])
    assert sample(logits, batch).tolist() == [6, 5]
    assert torch.equal(process_logits(logits, batch)[1], logits[1])


# ---------------------------------------------------------------- cost and neutrality


def test_a_batch_without_knobs_builds_no_processor():
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=3)]
    batch = build(params, [[1, 2, 3], [4, 4, 4, 4]], [2, 1])
    skipped = ["sequence_bias", "repetition", "generated_counts", "banned", "temperature", "top_k", "top_p",
               "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "renormalize"]
    assert all(getattr(batch, name) is None for name in skipped)
    logits = random_logits(2, 0)
    assert process_logits(logits, batch) is logits  # float32 in, nothing to do: the same tensor


def test_warpers_of_greedy_rows_are_not_built():
    batch = build([SamplingParams(temperature=0.0, top_k=3, top_p=0.5, min_p=0.2, typical_p=0.5)], [[1]], [1])
    assert batch.top_k is None and batch.top_p is None and batch.min_p is None and batch.typical_p is None


def test_ids_outside_the_vocabulary_are_ignored():
    params = [SamplingParams(temperature=0.0, suppress_tokens=[3, 500], sequence_bias={(600,): 1.0})]
    batch = SamplingBatch.build(params, [[1, 2]], [1], [None], CPU, vocab_size=VOCAB)
    assert batch.sequence_bias is None and batch.banned.tokens.tolist() == [3]


# ---------------------------------------------------------------- n-gram helper


@pytest.mark.parametrize("ngram_size", [1, 2, 3, 4])
def test_ngram_bans_match_transformers_on_long_histories(ngram_size):
    rng = random.Random(ngram_size)
    for _ in range(50):
        ids = [rng.randrange(4) for _ in range(rng.randint(1, 60))]
        logits = torch.zeros(1, 8)
        ref = NoRepeatNGramLogitsProcessor(ngram_size)(torch.tensor([ids]), logits)
        expected = set(torch.isinf(ref[0]).nonzero()[:, 0].tolist())
        assert ngram_bans_for_row(ids, ngram_size) == expected


# ---------------------------------------------------------------- incremental state


def _history_params(rng: random.Random, seed: int) -> SamplingParams:
    """Random history-dependent knobs (and sometimes sampling), so that each request's state differs."""
    sampled = rng.random() < 0.5
    return SamplingParams(
        temperature=1.5 if sampled else 0.0, seed=seed if sampled else None, top_p=rng.choice([1.0, 0.9]),
        repetition_penalty=rng.choice([1.0, 1.05, 1.3, 0.8]),
        presence_penalty=rng.choice([0.0, 0.5]), frequency_penalty=rng.choice([0.0, 0.3, -0.2]),
        no_repeat_ngram_size=rng.choice([0, 0, 1, 2, 3, 4]), min_tokens=rng.choice([0, 3]),
        bad_words_ids=rng.choice([[], [[5, 6], [7]]]), stop_token_ids=[2], max_tokens=10_000, ignore_eos=True,
    )


def _assert_same_processing(batch: SamplingBatch, params, token_ids, num_prompt, vocab: int, seed: int) -> None:
    stateless = SamplingBatch.build(
        params, [list(ids) for ids in token_ids], num_prompt, [None] * len(params), CPU, vocab_size=vocab
    )
    logits = torch.randn(len(params), vocab, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(process_logits(logits, batch), process_logits(logits, stateless))


def test_incremental_state_equals_the_stateless_build_over_a_long_generation():
    """Per-request state kept across 1500 steps, with rows joining, leaving and changing places,
    several tokens appended at once, released ids reused and long appended tails (rebuilds and
    re-sorts of the repetition pairs): every step processes logits exactly as a fresh build."""
    from tokenloom.sampling.sampler import SamplingState

    rng = random.Random(0)
    vocab = 3000
    state = SamplingState(CPU)
    live: dict[str, tuple[SamplingParams, list[int], int]] = {}
    next_id = 0
    for step in range(1500):
        while len(live) < 6:
            rid = f"r{next_id % 9}"  # ids come back after release
            if rid in live:
                next_id += 1
                continue
            next_id += 1
            prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
            live[rid] = (_history_params(rng, next_id), prompt, len(prompt))
        ids = list(live)
        if step % 50 == 0:
            rng.shuffle(ids)
        rows = [live[rid] for rid in ids]
        params, token_ids, num_prompt = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
        batch = SamplingBatch.build(params, token_ids, num_prompt, [None] * len(params), CPU, vocab_size=vocab,
                                    state=state, request_ids=ids)
        _assert_same_processing(batch, params, token_ids, num_prompt, vocab, step)
        for tokens in token_ids:  # mostly one token; sometimes several, from a small or a large range
            high = rng.choice([vocab, 12])
            tokens.extend(rng.randrange(high) for _ in range(rng.choice([1, 1, 1, 3])))
        if rng.random() < 0.02:
            done = rng.choice(ids)
            del live[done]
            state.release(done)
            assert done not in state


def test_incremental_state_survives_preemption_in_the_engine(tmp_path, monkeypatch):
    """A tiny engine with few KV blocks preempts and recomputes sequences; at every step the state
    the runner keeps processes logits exactly as a stateless build from the token lists, and a
    request id used again after release starts from fresh state."""
    from tokenloom import AutoModelForCausalLM, EngineConfig
    from tokenloom.engine import model_runner

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, eos_token_id=2, pad_token_id=0,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), engine_config=EngineConfig(block_size=2, num_kv_blocks=60))
    engine = model.engine
    num_checked = 0

    class CheckedBatch(SamplingBatch):
        @classmethod
        def build(cls, params, token_ids, num_prompt_tokens, generators, device, vocab_size=None, state=None,
                  request_ids=None, grammars=None):
            nonlocal num_checked
            assert state is not None and request_ids is not None
            batch = SamplingBatch.build(params, token_ids, num_prompt_tokens, generators, device, vocab_size,
                                        state=state, request_ids=request_ids, grammars=grammars)
            _assert_same_processing(batch, params, token_ids, num_prompt_tokens, vocab_size, num_checked)
            num_checked += 1
            return batch

    monkeypatch.setattr(model_runner, "SamplingBatch", CheckedBatch)
    rng = random.Random(1)
    preempted = 0
    for round_ in range(2):  # the second round reuses the first round's request ids
        for i in range(4):
            prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 12))]
            params = _history_params(rng, i + 10 * round_)
            params.max_tokens = rng.randint(40, 70)
            engine.add_request(prompt, params, request_id=f"req{i}", detokenize=False)
        preempted += run_counting_preemptions(engine)
        assert not any(f"req{i}" in engine.runner._sampling_state for i in range(4))
    assert preempted > 0 and num_checked > 100
