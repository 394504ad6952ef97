"""Engine and face behaviour around failures, empty input and interleaved consumers."""

from __future__ import annotations

import threading

import pytest
import torch

from tokenloom import LLM, AutoModelForCausalLM, SamplingParams

transformers = pytest.importorskip("transformers")

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, eos_token_id=2, pad_token_id=0,
    )
    path = tmp_path_factory.mktemp("tiny_api")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(str(path))


def _idle(engine) -> bool:
    return not engine.has_unfinished() and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_rejected_row_leaves_the_model_usable(tiny):
    good = torch.tensor([[5, 6, 7]])
    expected = tiny.generate(good, max_new_tokens=5, do_sample=False)
    bad_batch = torch.tensor([[5, 6, 7], [8, 9, 500]])
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 97\).*500"):
        tiny.generate(bad_batch, max_new_tokens=5, do_sample=False)
    assert _idle(tiny.engine)
    assert torch.equal(tiny.generate(good, max_new_tokens=5, do_sample=False), expected)
    assert tiny(good).logits.shape == (1, 3, 97)


def test_stop_ids_outside_the_vocabulary_are_rejected(tiny):
    with pytest.raises(ValueError, match=r"stop_token_ids must be in \[0, 97\).*1000"):
        tiny.engine.add_request([1, 2], SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1000]))
    with pytest.raises(ValueError, match="stop_token_ids"):
        tiny.generate(torch.tensor([[3, 4]]), max_new_tokens=4, min_new_tokens=2, eos_token_id=500)
    with pytest.raises(ValueError, match="token ids of prompt 0"):
        tiny(torch.tensor([[3, 400]]))
    assert _idle(tiny.engine)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("suppress_tokens", SamplingParams(temperature=0, suppress_tokens=[5, 97])),
        ("begin_suppress_tokens", SamplingParams(temperature=0, begin_suppress_tokens=[200])),
        ("bad_words_ids", SamplingParams(temperature=0, bad_words_ids=[[3, 4], [120]])),
        ("sequence_bias", SamplingParams(temperature=0, sequence_bias={(1, 300): 2.0})),
    ],
)
def test_processor_ids_outside_the_vocabulary_are_rejected(tiny, name, params):
    with pytest.raises(ValueError, match=rf"{name} must be in \[0, 97\)"):
        tiny.engine.add_request([1, 2], params)
    assert _idle(tiny.engine)


def test_a_stream_ends_with_abort_when_another_caller_aborts_its_request(tiny):
    engine = tiny.engine
    mine = engine.add_request([1, 2, 3], GREEDY)
    other = engine.add_request([4, 5], GREEDY)
    outputs = []
    for out in engine.stream([mine]):
        outputs.append(out)
        if len(outputs) == 2:
            engine.abort(mine)  # e.g. a server's cancel endpoint, not this consumer
    assert [o.finished for o in outputs] == [False, False, True]
    assert outputs[-1].finish_reason == "abort" and outputs[-1].request_id == mine
    list(engine.stream([other]))
    assert _idle(engine)


def test_empty_batches(tiny):
    empty = torch.zeros((0, 4), dtype=torch.long)
    assert tiny.generate(empty, max_new_tokens=3).shape == (0, 4)


def test_interleaved_streams_each_get_their_own_tokens(tiny):
    engine = tiny.engine
    alone = []
    for prompt in ([1, 2, 3], [9, 8, 7, 6, 5]):
        (rid,) = engine.add_requests([(prompt, GREEDY)])
        alone.append([t for out in engine.stream([rid]) for t in out.new_token_ids])
    a, b = engine.add_requests([([1, 2, 3], GREEDY), ([9, 8, 7, 6, 5], GREEDY)])
    stream_a, stream_b = engine.stream([a]), engine.stream([b])
    got = {a: [], b: []}
    live = {a: stream_a, b: stream_b}
    while live:  # alternate between the two consumers, one output each
        for rid, stream in list(live.items()):
            out = next(stream, None)
            if out is None:
                del live[rid]
                continue
            assert out.request_id == rid
            got[rid].extend(out.new_token_ids)
    assert [got[a], got[b]] == alone
    assert _idle(engine)


def test_closing_a_stream_early_aborts_its_request(tiny):
    engine = tiny.engine
    (rid,) = engine.add_requests([([4, 5, 6], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))])
    stream = engine.stream([rid])
    next(stream)
    stream.close()
    assert _idle(engine)


def test_loading_a_gguf_keeps_the_thread_count_of_new_threads(smollm2_gguf):
    from tokenloom.loading import load_model

    before = torch.get_num_threads()
    load_model(str(smollm2_gguf))
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert seen == [before] and torch.get_num_threads() == before


def test_llm_requests_stop_at_eos_even_with_user_params(smollm2_gguf):
    llm = LLM(str(smollm2_gguf))
    prompt = llm.chat_prompt([{"role": "user", "content": "Say hi."}])
    (done,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=200))
    assert done.finish_reason == "eos" and done.token_ids[-1] in llm.stop_token_ids
    streamed = [out for out in llm.stream(prompt, SamplingParams(temperature=0, max_tokens=200))]
    assert streamed[-1].finished and [t for o in streamed for t in o.new_token_ids] == done.token_ids
    assert "".join(o.text_delta for o in streamed) == done.text


# ---------------------------------------------------------------- per-row decoding knobs on SmolLM2


@pytest.fixture(scope="module")
def smollm2_engine(smollm2_gguf, one_torch_thread):
    return LLM(str(smollm2_gguf), dtype="float32").engine


def _run(engine, requests) -> list[dict]:
    """Run the requests together; per request: tokens and the per-token logprobs/scores/logits."""
    ids = engine.add_requests(requests, detokenize=False)
    got = {rid: {"tokens": [], "logprobs": [], "scores": [], "logits": []} for rid in ids}
    for out in engine.stream(ids):
        entry = got[out.request_id]
        entry["tokens"].extend(out.new_token_ids)
        for key in ("logprobs", "scores", "logits"):
            value = getattr(out, key)
            entry[key].extend(value if value is not None else [None] * len(out.new_token_ids))
    return [got[rid] for rid in ids]


_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):",
    "List three colors:",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Water boils at",
    "In 1492,",
    "Q: What is two plus two?\nA:",
]


def _mixed_settings(eos: int) -> list[SamplingParams]:
    """Eight requests with different settings: greedy and seeded sampling, many knobs."""
    common = {"max_tokens": 10, "ignore_eos": True}
    return [
        SamplingParams(temperature=0.0, repetition_penalty=1.3, **common),
        SamplingParams(temperature=0.9, top_k=20, seed=11, **common),
        SamplingParams(temperature=0.0, bad_words_ids=[[198], [28, 29]], no_repeat_ngram_size=2, **common),
        SamplingParams(temperature=1.1, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3, seed=12, **common),
        SamplingParams(temperature=0.0, sequence_bias={(314,): 3.0}, suppress_tokens=[30], **common),
        SamplingParams(temperature=0.8, top_p=0.9, typical_p=0.95, seed=13, **common),
        SamplingParams(temperature=1.0, epsilon_cutoff=3e-4, eta_cutoff=1e-3, seed=14, min_tokens=3,
                       stop_token_ids=[eos], max_tokens=10),
        SamplingParams(temperature=0.7, top_k=50, top_p=0.8, min_p=0.02, repetition_penalty=1.1, seed=15,
                       renormalize_logits=True, **common),
    ]


def test_requests_decode_the_same_alone_or_in_a_mixed_batch(smollm2_engine):
    """The issue's batch invariance: each request (greedy or seeded sampling) gives the same tokens
    whether it runs alone or with 7 others of different prompt lengths and settings."""
    engine = smollm2_engine
    tokenizer = engine.tokenizer
    prompts = [tokenizer.encode(p) for p in _PROMPTS]
    assert len({len(p) for p in prompts}) >= 6
    settings = _mixed_settings(tokenizer.eos_token_id)
    alone = [_run(engine, [(prompt, params)])[0]["tokens"] for prompt, params in zip(prompts, settings)]
    together = [r["tokens"] for r in _run(engine, list(zip(prompts, settings)))]
    assert together == alone
    reversed_batch = [r["tokens"] for r in _run(engine, list(zip(prompts, settings))[::-1])]
    assert reversed_batch[::-1] == alone
    assert all(len(t) >= 3 for t in alone)
    # the knobs act: without them the greedy rows decode differently
    plain = _run(engine, [(prompts[0], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))])[0]
    assert plain["tokens"] != alone[0]
    assert _idle(engine)


def test_logprobs_scores_and_logits_match_a_direct_calculation(smollm2_engine):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
    )

    engine = smollm2_engine
    prompt = engine.tokenizer.encode("The best way to learn a language is")
    asks = {"logprobs": 5, "output_scores": True, "output_logits": True, "max_tokens": 8, "ignore_eos": True}
    sampled, greedy, silent = _run(engine, [
        (prompt, SamplingParams(temperature=0.8, top_k=20, repetition_penalty=1.3, seed=5, **asks)),
        (prompt, SamplingParams(temperature=0.0, repetition_penalty=1.3, **asks)),
        (prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)),
    ])
    assert silent["logprobs"] == [None] * 8 and silent["scores"] == [None] * 8 and silent["logits"] == [None] * 8
    chains = {
        "sampled": LogitsProcessorList([
            RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.8), TopKLogitsWarper(20),
        ]),
        "greedy": LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3)]),
    }
    for name, got in (("sampled", sampled), ("greedy", greedy)):
        tokens = got["tokens"]
        reference = engine.prompt_logits([prompt + tokens[:-1]])[0][len(prompt) - 1 :].float()  # [8, vocab]
        for i, token in enumerate(tokens):
            raw = got["logits"][i]
            assert raw.dtype == torch.float32 and raw.shape == reference[i].shape
            assert (raw - reference[i]).abs().max().item() <= 5e-4  # decode step vs one prefill: 3e-5 measured
            expected = reference[i].log_softmax(-1)
            logprob = got["logprobs"][i]
            assert logprob.token_id == token
            assert abs(logprob.logprob - expected[token].item()) <= 1e-4
            assert len(logprob.top) == 5
            top_values = expected.topk(5).values.tolist()
            assert [v for _, v in logprob.top] == pytest.approx(top_values, abs=1e-4)
            assert all(abs(expected[t].item() - v) <= 1e-4 for t, v in logprob.top)
            # exactly: the logprobs are the log-softmax of the very logits row returned
            assert logprob.logprob == pytest.approx(raw.log_softmax(-1)[token].item(), abs=1e-6)
            # the processed scores are what transformers' processors make of that row
            ids = torch.tensor([prompt + tokens[:i]])
            ref_scores = chains[name](ids, raw[None].clone())[0]
            assert torch.equal(torch.isinf(got["scores"][i]), torch.isinf(ref_scores))
            finite = ~torch.isinf(ref_scores)
            assert (got["scores"][i][finite] - ref_scores[finite]).abs().max().item() <= 1e-6
            if name == "greedy":
                assert token == int(ref_scores.argmax())
            else:
                assert finite[token]  # the sampled token survived top-k
    assert _idle(engine)
