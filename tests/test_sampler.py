"""The sampler (per-row tensors) against transformers' own logits warpers, per-request generators,
hand-built distributions, and SamplingParams validation.

transformers applies one warper per setting to a whole batch; tokenloom applies per-row settings in
one pass. The oracle is therefore transformers run row by row with that row's settings.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tokenloom.sampling.sampler import SamplingBatch, apply_top_k, apply_top_p, process_logits, sample
from tokenloom.sampling_params import SamplingParams

VOCAB = 500
CPU = torch.device("cpu")


def build(params, num_outputs, generators) -> SamplingBatch:
    """SamplingBatch.build for rows whose token history does not matter: a 3-token prompt followed
    by num_outputs[i] generated tokens."""
    token_ids = [[1, 2, 3] + [4] * n for n in num_outputs]
    return SamplingBatch.build(params, token_ids, [3] * len(params), generators, CPU)


def make_batch(params, num_outputs=None, seeds=None) -> SamplingBatch:
    """A batch as the model runner builds it: one generator per sampling row (None for greedy)."""
    num_outputs = num_outputs or [0] * len(params)
    seeds = seeds or [0] * len(params)
    generators = []
    for p, seed in zip(params, seeds):
        if p.is_greedy:
            generators.append(None)
        else:
            generators.append(torch.Generator().manual_seed(seed))
    return build(params, num_outputs, generators)


def hf_warpers(p: SamplingParams) -> LogitsProcessorList:
    """The warpers transformers' generate() builds for do_sample=True with these settings."""
    chain = LogitsProcessorList()
    if p.is_greedy:
        return chain
    if p.temperature != 1.0:
        chain.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k != 0:
        chain.append(TopKLogitsWarper(top_k=p.top_k, min_tokens_to_keep=1))
    if p.top_p < 1.0:
        chain.append(TopPLogitsWarper(top_p=p.top_p, min_tokens_to_keep=1))
    return chain


def assert_same_filtering(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Same -inf pattern (same kept set) and the kept values equal to 1e-6."""
    assert ours.shape == ref.shape
    assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (
        f"kept sets differ: ours keeps {(~torch.isinf(ours)).sum(-1).tolist()}, "
        f"transformers keeps {(~torch.isinf(ref)).sum(-1).tolist()}"
    )
    finite = ~torch.isinf(ref)
    assert torch.allclose(ours[finite], ref[finite], atol=1e-6, rtol=0)


def random_logits(rows: int, seed: int, vocab: int = VOCAB, with_ties: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 3
    if with_ties:
        logits = torch.round(logits * 2) / 2  # a coarse grid: many exact ties, also at the k-th value
    return logits


# ---------------------------------------------------------------- warpers vs transformers


@pytest.mark.parametrize("with_ties", [False, True])
def test_top_k_per_row_matches_transformers(with_ties):
    top_ks = [1, 2, 5, 50, 0, VOCAB - 1, VOCAB, VOCAB + 100]
    logits = random_logits(len(top_ks), seed=1, with_ties=with_ties)
    ours = apply_top_k(logits.clone(), torch.tensor(top_ks))
    for row, k in enumerate(top_ks):
        ref = logits[row : row + 1].clone()
        if k != 0:  # transformers' generate() adds no top-k warper for top_k=0
            ref = TopKLogitsWarper(top_k=k)(None, ref)
        assert_same_filtering(ours[row : row + 1], ref)
    if with_ties:
        # the grid really puts ties at the k-th value: more than k tokens survive for some row
        kept = (~torch.isinf(ours)).sum(-1)
        assert any(int(kept[i]) > k for i, k in enumerate(top_ks) if 0 < k < VOCAB)


def test_top_k_keeps_every_token_tied_with_the_kth():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0, 2.0]])
    ours = apply_top_k(logits.clone(), torch.tensor([2]))
    ref = TopKLogitsWarper(top_k=2)(None, logits.clone())
    assert_same_filtering(ours, ref)
    # the 2nd largest value is 2.0 and three tokens hold it: all of them stay, as in transformers
    assert (~torch.isinf(ours)).nonzero()[:, 1].tolist() == [0, 2, 3, 5]


def test_top_p_per_row_matches_transformers():
    top_ps = [1.0, 0.99, 0.9, 0.75, 0.5, 0.2, 0.05, 1e-6]
    logits = random_logits(len(top_ps), seed=2)
    batch = make_batch([SamplingParams(top_p=p) for p in top_ps])
    ours = process_logits(logits.clone(), batch)  # top-p runs on the rows below 1 only
    # the warper itself over every row (rows at 1.0 untouched) gives the same
    assert torch.equal(apply_top_p(logits.clone(), torch.tensor(top_ps, dtype=torch.float64)), ours)
    for row, p in enumerate(top_ps):
        ref = logits[row : row + 1].clone()
        if p < 1.0:  # transformers' generate() adds no top-p warper for top_p=1.0
            ref = TopPLogitsWarper(top_p=p)(None, ref)
        assert_same_filtering(ours[row : row + 1], ref)
    kept = (~torch.isinf(ours)).sum(-1).tolist()
    assert kept[0] == VOCAB  # top_p=1.0 keeps every token
    assert kept[-1] == 1  # a tiny top_p keeps only the argmax
    assert not torch.isinf(ours[-1, logits[-1].argmax()])
    assert kept == sorted(kept, reverse=True)  # a smaller nucleus never keeps more


def test_top_p_with_ties_matches_transformers():
    logits = random_logits(4, seed=3, with_ties=True)
    top_ps = [0.3, 0.6, 0.9, 0.95]
    ours = process_logits(logits.clone(), make_batch([SamplingParams(top_p=p) for p in top_ps]))
    for row, p in enumerate(top_ps):
        assert_same_filtering(ours[row : row + 1], TopPLogitsWarper(top_p=p)(None, logits[row : row + 1].clone()))


def test_top_p_cutoff_rounds_like_transformers():
    """transformers compares the float32 cumulative sum with float32(1 - top_p) where 1 - top_p is
    computed in double precision. With top_p=0.9 that cutoff is float32(0.09999999999999998) = 0.1f,
    whereas 1 - float32(0.9) is 0.100000024. A token whose cumulative mass falls between the two
    must be kept."""
    low, high = np.float32(1 - 0.9), np.float32(1) - np.float32(0.9)
    assert low < high
    a = np.float32(math.log(0.1 / 0.9)) - np.float32(1e-5)
    for _ in range(1000):  # walk the float32 logits until the smaller token's mass lands in (low, high]
        logits = torch.tensor([[float(a), 0.0]])
        mass = torch.sort(logits, dim=-1).values.softmax(-1).cumsum(-1)[0, 0].item()
        if low < mass <= high:
            break
        a = np.nextafter(a, np.float32(1))
    else:
        pytest.fail("no float32 logit found whose mass lies between the two cutoffs")
    batch = make_batch([SamplingParams(top_p=0.9)])
    ref = TopPLogitsWarper(top_p=0.9)(None, logits.clone())
    assert not torch.isinf(ref).any()  # transformers keeps both tokens
    assert_same_filtering(process_logits(logits.clone(), batch), ref)


def test_top_p_of_one_leaves_underflowing_tokens_alone_in_a_mixed_batch():
    """A row with top_p=1.0 sharing a batch with a top_p<1 row must stay untouched (transformers adds
    no warper there), even for a token whose probability underflows to 0 in float32."""
    logits = torch.tensor([[0.0, -200.0, 5.0], [0.0, -200.0, 5.0]])
    batch = make_batch([SamplingParams(top_p=1.0), SamplingParams(top_p=0.5)])
    out = process_logits(logits.clone(), batch)
    assert torch.equal(out[0], logits[0])
    assert_same_filtering(out[1:], TopPLogitsWarper(top_p=0.5)(None, logits[1:].clone()))


def test_temperature_per_row_matches_transformers():
    temps = [0.1, 0.5, 0.7, 1.0, 1.3, 2.0]
    logits = random_logits(len(temps), seed=4)
    out = process_logits(logits.clone(), make_batch([SamplingParams(temperature=t) for t in temps]))
    for row, t in enumerate(temps):
        ref = TemperatureLogitsWarper(t)(None, logits[row : row + 1].clone())
        assert_same_filtering(out[row : row + 1], ref)


def test_full_warper_chain_matches_transformers_row_by_row():
    params = [
        SamplingParams(temperature=0.7, top_k=50, top_p=0.9),
        SamplingParams(temperature=1.0, top_k=0, top_p=1.0),
        SamplingParams(temperature=1.5, top_k=10, top_p=1.0),
        SamplingParams(temperature=0.3, top_k=0, top_p=0.5),
        SamplingParams(temperature=0.0),  # a greedy row in a sampling batch: logits untouched
        SamplingParams(temperature=2.0, top_k=400, top_p=0.95),
        SamplingParams(temperature=0.05, top_k=3, top_p=0.8),
        SamplingParams(temperature=1.0, top_k=1),
    ]
    for seed, with_ties in [(5, False), (6, True)]:
        logits = random_logits(len(params), seed=seed, with_ties=with_ties)
        out = process_logits(logits.clone(), make_batch(params))
        for row, p in enumerate(params):
            ref = hf_warpers(p)(None, logits[row : row + 1].clone())
            assert_same_filtering(out[row : row + 1], ref)


def test_all_greedy_batch_returns_raw_logits():
    logits = random_logits(3, seed=7)
    batch = make_batch([SamplingParams(temperature=0.0)] * 3)
    assert batch.all_greedy
    assert torch.equal(process_logits(logits.clone(), batch), logits)
    assert torch.equal(sample(logits, batch), logits.argmax(-1))


# ---------------------------------------------------------------- min_tokens


def test_min_tokens_masks_stop_ids_like_transformers():
    stop = [7, 11]
    logits = random_logits(4, seed=8)
    logits[:, 7] = 50.0  # the stop id is by far the most likely token
    params = [SamplingParams(temperature=0.0, min_tokens=3, max_tokens=10, stop_token_ids=stop)] * 4
    num_outputs = [0, 1, 2, 3]
    out = process_logits(logits.clone(), make_batch(params, num_outputs))
    prompt_len = 5
    for row, n in enumerate(num_outputs):
        processor = MinNewTokensLengthLogitsProcessor(prompt_len, 3, torch.tensor(stop))
        ids = torch.zeros((1, prompt_len + n), dtype=torch.long)
        assert_same_filtering(out[row : row + 1], processor(ids, logits[row : row + 1].clone()))
    greedy = sample(logits, make_batch(params, num_outputs)).tolist()
    without_stop = logits.clone()
    without_stop[:, stop] = float("-inf")
    assert greedy[:3] == without_stop.argmax(-1).tolist()[:3]  # below min_tokens: no stop id
    assert greedy[3] == 7  # min_tokens reached: the stop id is allowed again


def test_min_tokens_stop_id_is_never_sampled():
    logits = torch.zeros(1, 20)
    logits[0, 3] = 30.0  # ~all of the mass on the stop id
    params = SamplingParams(temperature=1.0, min_tokens=2, max_tokens=5, stop_token_ids=[3])
    generator = torch.Generator().manual_seed(0)
    below = build([params], [1], [generator])
    draws = [int(sample(logits, below)[0]) for _ in range(200)]
    assert 3 not in draws
    reached = build([params], [2], [generator])
    assert int(sample(logits, reached)[0]) == 3


def test_ignore_eos_does_not_mask_stop_ids():
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[1], ignore_eos=True)
    batch = make_batch([params])
    assert batch.banned is None


# ---------------------------------------------------------------- per-request generators


def _draws_for_row(target: SamplingParams, others: list[SamplingParams], position: int, steps: int) -> list[int]:
    """`steps` draws for the target row (seed 1234) placed at `position` among `others`."""
    params = list(others)
    params.insert(position, target)
    seeds = [100 + i for i in range(len(params))]
    seeds[position] = 1234
    generators = [None if p.is_greedy else torch.Generator().manual_seed(s) for p, s in zip(params, seeds)]
    draws = []
    for step in range(steps):
        logits = random_logits(len(params), seed=1000 + step, vocab=200)
        logits[position] = random_logits(1, seed=5000 + step, vocab=200)[0]  # the target's own logits
        batch = build(params, [step] * len(params), generators)
        draws.append(int(sample(logits, batch)[position]))
    return draws


def test_same_seed_same_draws_whatever_shares_the_batch():
    target = SamplingParams(temperature=1.2, top_k=40, top_p=0.95)
    alone = _draws_for_row(target, [], 0, steps=25)
    compositions = [
        ([SamplingParams(temperature=0.5)], 1),
        ([SamplingParams(temperature=0.0), SamplingParams(top_k=3), SamplingParams(top_p=0.2)], 2),
        ([SamplingParams(temperature=0.9, top_k=5)] * 5, 0),
    ]
    for others, position in compositions:
        assert _draws_for_row(target, others, position, steps=25) == alone
    assert len(set(alone)) > 5  # the draws really vary from step to step


def test_different_seeds_give_different_draws():
    logits = torch.zeros(1, 100)  # uniform: two generators agreeing on 20 draws has probability 1e-40
    params = [SamplingParams(temperature=1.0)]
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    draws1 = [int(sample(logits, build(params, [0], [g1]))[0]) for _ in range(20)]
    draws2 = [int(sample(logits, build(params, [0], [g2]))[0]) for _ in range(20)]
    assert draws1 != draws2


# ---------------------------------------------------------------- hand-built distributions

PROBS = [0.5, 0.3, 0.2] + [0.0] * 7
NUM_DRAWS = 4000


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        # the distribution itself
        (SamplingParams(temperature=1.0), [0.5, 0.3, 0.2]),
        # top_k=2 renormalises the two largest: 0.5/0.8, 0.3/0.8
        (SamplingParams(temperature=1.0, top_k=2), [0.625, 0.375, 0.0]),
        # ascending cumulative mass 0.2, 0.5, 1.0: top_p=0.75 drops what is <= 0.25, i.e. the 0.2 token
        (SamplingParams(temperature=1.0, top_p=0.75), [0.625, 0.375, 0.0]),
        # temperature 2 on log-probabilities: p_i^(1/2) renormalised
        (
            SamplingParams(temperature=2.0),
            [math.sqrt(p) / sum(math.sqrt(q) for q in (0.5, 0.3, 0.2)) for p in (0.5, 0.3, 0.2)],
        ),
    ],
)
def test_sampled_frequencies_follow_the_distribution(params, expected):
    logits = torch.tensor([PROBS]).log()  # log 0 = -inf: those tokens can never be drawn
    generator = torch.Generator().manual_seed(42)
    batch = build([params], [0], [generator])
    counts = torch.bincount(torch.cat([sample(logits, batch) for _ in range(NUM_DRAWS)]), minlength=10)
    assert counts[3:].sum() == 0
    for token, p in enumerate(expected):
        freq = counts[token].item() / NUM_DRAWS
        # binomial standard error; 4.5 of them leaves a false alarm rate of ~1e-5 per check
        tolerance = 4.5 * math.sqrt(max(p * (1 - p), 1e-12) / NUM_DRAWS)
        assert abs(freq - p) <= tolerance, f"token {token}: frequency {freq:.4f}, expected {p:.4f}"


# ---------------------------------------------------------------- SamplingParams validation


@pytest.mark.parametrize(
    ("kwargs", "name", "shown"),
    [
        ({"temperature": -0.5}, "temperature", "-0.5"),
        ({"temperature": float("nan")}, "temperature", "nan"),
        ({"temperature": float("inf")}, "temperature", "inf"),
        ({"temperature": "0.7"}, "temperature", "'0.7'"),
        ({"temperature": True}, "temperature", "True"),
        ({"top_p": 0.0}, "top_p", "0.0"),
        ({"top_p": 1.5}, "top_p", "1.5"),
        ({"top_p": float("nan")}, "top_p", "nan"),
        ({"top_k": -1}, "top_k", "-1"),
        ({"top_k": 2.5}, "top_k", "2.5"),
        ({"top_k": True}, "top_k", "True"),
        ({"max_tokens": 0}, "max_tokens", "0"),
        ({"max_tokens": True}, "max_tokens", "True"),
        ({"max_tokens": 10.0}, "max_tokens", "10.0"),
        ({"min_tokens": -1}, "min_tokens", "-1"),
        ({"min_tokens": 5, "max_tokens": 3}, "min_tokens", "5"),
        ({"seed": -1}, "seed", "-1"),
        ({"seed": False}, "seed", "False"),
        ({"seed": 1.0}, "seed", "1.0"),
        ({"stop_token_ids": [2, -3]}, "stop_token_ids", "-3"),
        ({"stop_token_ids": [True]}, "stop_token_ids", "True"),
        ({"min_p": -0.1}, "min_p", "-0.1"),
        ({"min_p": 1.5}, "min_p", "1.5"),
        ({"typical_p": 0.0}, "typical_p", "0.0"),
        ({"typical_p": 1.2}, "typical_p", "1.2"),
        ({"epsilon_cutoff": 1.0}, "epsilon_cutoff", "1.0"),
        ({"epsilon_cutoff": -1e-3}, "epsilon_cutoff", "-0.001"),
        ({"eta_cutoff": 1.0}, "eta_cutoff", "1.0"),
        ({"eta_cutoff": -0.5}, "eta_cutoff", "-0.5"),
        ({"repetition_penalty": 0.0}, "repetition_penalty", "0.0"),
        ({"repetition_penalty": -1.2}, "repetition_penalty", "-1.2"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty", "inf"),
        ({"presence_penalty": 2.5}, "presence_penalty", "2.5"),
        ({"presence_penalty": -3}, "presence_penalty", "-3"),
        ({"frequency_penalty": -2.01}, "frequency_penalty", "-2.01"),
        ({"frequency_penalty": "1"}, "frequency_penalty", "'1'"),
        ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size", "-1"),
        ({"no_repeat_ngram_size": 2.0}, "no_repeat_ngram_size", "2.0"),
        ({"bad_words_ids": [[1, 2], []]}, "bad_words_ids", "[]"),
        ({"bad_words_ids": [1, 2]}, "bad_words_ids", "[1, 2]"),
        ({"bad_words_ids": [[1, -2]]}, "bad_words_ids", "-2"),
        ({"bad_words_ids": [["a"]]}, "bad_words_ids", "'a'"),
        ({"bad_words_ids": "x"}, "bad_words_ids", "'x'"),
        ({"sequence_bias": {(): 1.0}}, "sequence_bias", "()"),
        ({"sequence_bias": {5: 1.0}}, "sequence_bias", "5"),
        ({"sequence_bias": {(5, -1): 1.0}}, "sequence_bias", "-1"),
        ({"sequence_bias": {(5,): float("nan")}}, "sequence_bias", "nan"),
        ({"sequence_bias": {(5,): "big"}}, "sequence_bias", "'big'"),
        ({"sequence_bias": [[[5], 1.0]]}, "sequence_bias", "[[[5], 1.0]]"),
        ({"suppress_tokens": [-1]}, "suppress_tokens", "-1"),
        ({"suppress_tokens": [1.5]}, "suppress_tokens", "1.5"),
        ({"begin_suppress_tokens": [-4]}, "begin_suppress_tokens", "-4"),
        ({"stop": [""]}, "stop", "''"),
        ({"stop": ["ok", 3]}, "stop", "3"),
        ({"max_time": 0}, "max_time", "0"),
        ({"max_time": -1.0}, "max_time", "-1.0"),
        ({"max_time": float("nan")}, "max_time", "nan"),
        ({"logprobs": -1}, "logprobs", "-1"),
        ({"logprobs": 21}, "logprobs", "21"),
        ({"logprobs": 2.0}, "logprobs", "2.0"),
        ({"renormalize_logits": 1}, "renormalize_logits", "1"),
        ({"output_scores": "yes"}, "output_scores", "'yes'"),
        ({"output_logits": None}, "output_logits", "None"),
        ({"include_stop_str_in_output": 0}, "include_stop_str_in_output", "0"),
        ({"ignore_eos": None}, "ignore_eos", "None"),
    ],
)
def test_invalid_sampling_params_name_the_parameter_and_value(kwargs, name, shown):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    message = str(info.value)
    assert name in message
    assert shown in message


def test_min_tokens_above_max_tokens_names_both():
    with pytest.raises(ValueError, match=r"min_tokens \(5\).*max_tokens \(3\)"):
        SamplingParams(min_tokens=5, max_tokens=3)


def test_valid_sampling_params():
    p = SamplingParams(temperature=0, top_k=0, top_p=1, seed=0, max_tokens=1, min_tokens=1,
                       stop_token_ids=[2, 2, 5])
    assert p.is_greedy
    assert p.stop_token_ids == [2, 5]  # duplicates dropped, order kept
    assert not SamplingParams(temperature=1e-3).is_greedy


def test_valid_processor_params_and_their_normal_forms():
    p = SamplingParams(
        min_p=1, typical_p=1, epsilon_cutoff=0, eta_cutoff=0.999, repetition_penalty=0.5, presence_penalty=-2,
        frequency_penalty=2, no_repeat_ngram_size=3, bad_words_ids=[(1, 2), [3]], sequence_bias={(4,): 2, (5, 6): -1.5},
        suppress_tokens=(7, 8), begin_suppress_tokens=[9], stop="###", max_time=0.5, logprobs=0,
    )
    assert p.bad_words_ids == [[1, 2], [3]] and p.suppress_tokens == [7, 8]
    assert p.sequence_bias == {(4,): 2.0, (5, 6): -1.5} and isinstance(p.sequence_bias[(4,)], float)
    assert p.stop == ["###"]  # one string is a list of one
    assert SamplingParams(logprobs=20, max_time=None, seed=None).logprobs == 20


def test_every_range_check_names_its_allowed_range():
    messages = {}
    for kwargs in ({"top_p": 0}, {"min_p": 2}, {"epsilon_cutoff": 1}, {"presence_penalty": 3}, {"logprobs": 50}):
        with pytest.raises(ValueError) as info:
            SamplingParams(**kwargs)
        messages[next(iter(kwargs))] = str(info.value)
    assert "(0, 1]" in messages["top_p"] and "[0, 1]" in messages["min_p"]
    assert "[0, 1)" in messages["epsilon_cutoff"] and "[-2, 2]" in messages["presence_penalty"]
    assert "[0, 20]" in messages["logprobs"]
