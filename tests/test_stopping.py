"""Stopping on the real SmolLM2: stop strings (also across tokens), max_time, EOS; finish and stop
reasons; streamed deltas never leak a stop string."""

from __future__ import annotations

import pytest

from tokenloom import LLM, EngineConfig, SamplingParams
from tokenloom.detokenizer import IncrementalDetokenizer
from tokenloom.engine.engine import Engine

EXPLAIN = "<|im_start|>user\nExplain why the sky is blue.<|im_end|>\n<|im_start|>assistant\n"
FRANCE = "The capital of France is"


def _params(**overrides) -> SamplingParams:
    """Greedy; LLM adds the model's EOS ids. Built directly, not with LLM.sampling_params, whose
    transformers mapping keeps the stop string in the text as transformers does."""
    return SamplingParams(**{"temperature": 0.0, **overrides})


@pytest.fixture(scope="module")
def llm(smollm2_gguf, one_torch_thread) -> LLM:
    return LLM(str(smollm2_gguf), dtype="float32")


@pytest.fixture(scope="module")
def free_run(llm):
    """The greedy continuation of EXPLAIN without stop strings, and where each token's text begins."""
    completion = llm.generate(EXPLAIN, _params(max_tokens=40, ignore_eos=True))[0]
    ids = completion.token_ids
    ends = [len(llm.tokenizer.decode(ids[: i + 1], skip_special_tokens=True)) for i in range(len(ids))]
    assert completion.text == llm.tokenizer.decode(ids, skip_special_tokens=True)
    return completion.text, ids, ends


def _spanning_stop(text: str, ends: list[int]) -> str:
    """A stop string crossing a token boundary, from the middle of the output: the 2 characters
    before the end of one token's text and the 3 after it."""
    for boundary in ends[len(ends) // 3 : -1]:
        piece = text[boundary - 2 : boundary + 3]
        if boundary >= 2 and len(piece) == 5 and piece.isprintable() and piece == piece.strip():
            return piece
    raise AssertionError(f"no token boundary to build a stop string from in {text!r}")


def _expected_cut(text: str, ends: list[int], ids: list[int], stop: str, include: bool = False):
    """What stopping at the first occurrence must give: text before (or through) it, and the ids up
    to the token whose text completes it."""
    index = text.index(stop)
    last = next(i for i, end in enumerate(ends) if end >= index + len(stop))
    return text[: index + len(stop) if include else index], ids[: last + 1], index


def test_a_stop_string_spanning_tokens_stops_at_its_first_occurrence(llm, free_run):
    text, ids, ends = free_run
    stop = _spanning_stop(text, ends)
    expected_text, expected_ids, index = _expected_cut(text, ends, ids, stop)
    first_token = next(i for i, end in enumerate(ends) if end > index)
    assert first_token < len(expected_ids) - 1, "the stop string must span at least two tokens"
    params = _params(max_tokens=40, ignore_eos=True, stop=[stop])
    got = llm.generate(EXPLAIN, params)[0]
    assert got.text == expected_text
    assert got.token_ids == expected_ids
    assert (got.finish_reason, got.stop_reason) == ("stop", stop)
    # include_stop_str_in_output: cut right after it, same tokens
    params = _params(max_tokens=40, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
    got = llm.generate(EXPLAIN, params)[0]
    assert got.text == _expected_cut(text, ends, ids, stop, include=True)[0]
    assert got.text.endswith(stop) and got.token_ids == expected_ids
    assert (got.finish_reason, got.stop_reason) == ("stop", stop)
    # the engine finished the sequence: nothing queued, every KV block back in the pool
    manager = llm.engine.block_manager
    assert not llm.engine.has_unfinished() and manager.num_free_blocks == manager.num_blocks


def test_streaming_never_leaks_the_stop_string(llm, free_run):
    text, ids, ends = free_run
    stop = _spanning_stop(text, ends)
    expected_text, expected_ids, _ = _expected_cut(text, ends, ids, stop)
    outputs = list(llm.stream(EXPLAIN, _params(max_tokens=40, ignore_eos=True, stop=[stop])))
    deltas = [out.text_delta for out in outputs]
    assert "".join(deltas) == expected_text == outputs[-1].text
    streamed = ""
    for out in outputs:
        streamed += out.text_delta
        assert out.text == streamed
        assert expected_text.startswith(streamed)  # nothing past the cut, not even a piece of `stop`
    assert [t for out in outputs for t in out.new_token_ids] == expected_ids == outputs[-1].token_ids
    assert [out.finished for out in outputs] == [False] * (len(outputs) - 1) + [True]


def test_a_possible_start_is_held_then_released(llm, free_run):
    """A stop string whose beginning does occur (but never completes): the text is held while it
    could still match, released afterwards, and the output is the free run's."""
    text, ids, ends = free_run
    stop = _spanning_stop(text, ends) + "\x00never"
    outputs = list(llm.stream(EXPLAIN, _params(max_tokens=40, ignore_eos=True, stop=[stop])))
    assert "".join(out.text_delta for out in outputs) == text
    assert outputs[-1].finish_reason == "length" and outputs[-1].stop_reason is None
    held = [len(out.text) < ends[i] for i, out in enumerate(outputs)]
    assert any(held), "some text must have been held back while it could begin the stop string"


def test_the_earliest_of_several_stop_strings_wins(llm, free_run):
    text, ids, ends = free_run
    early = _spanning_stop(text, ends)
    early_end = text.index(early) + len(early)
    # a 3-character string that is first complete after `early` is
    later = next(
        text[i : i + 3] for i in range(early_end - 1, len(text) - 3)
        if text.index(text[i : i + 3]) + 3 > early_end and text[i : i + 3].strip() == text[i : i + 3]
    )
    expected_text, expected_ids, _ = _expected_cut(text, ends, ids, early)
    for stops in ([later, early], [early, later]):
        got = llm.generate(EXPLAIN, _params(max_tokens=40, ignore_eos=True, stop=stops))[0]
        assert (got.text, got.token_ids, got.stop_reason) == (expected_text, expected_ids, early)


def test_stop_strings_per_request_in_one_batch(llm, free_run):
    text, ids, ends = free_run
    stop = _spanning_stop(text, ends)
    alone = llm.generate(FRANCE, _params(max_tokens=12))[0]
    with_stop, plain = llm.generate(
        [EXPLAIN, FRANCE], [_params(max_tokens=40, ignore_eos=True, stop=[stop]),
                          _params(max_tokens=12)]
    )
    assert with_stop.text == _expected_cut(text, ends, ids, stop)[0] and with_stop.finish_reason == "stop"
    assert (plain.text, plain.token_ids, plain.finish_reason) == (alone.text, alone.token_ids, alone.finish_reason)


def test_max_time_finishes_with_time(llm):
    # The limit is checked after each token (transformers' MaxTimeCriteria): with a limit far below
    # one step's duration, the request ends after its first token.
    got = llm.generate(FRANCE, _params(max_tokens=30, ignore_eos=True, max_time=1e-6))[0]
    assert got.finish_reason == "time" and len(got.token_ids) == 1
    assert got.stop_reason is None
    assert not llm.engine.has_unfinished()


def test_eos_reports_the_stop_token_id(llm):
    got = llm.generate(FRANCE, _params(max_tokens=60))[0]
    assert got.finish_reason == "eos"
    assert got.stop_reason == got.token_ids[-1]
    assert got.stop_reason in llm.stop_token_ids
    free = llm.generate(FRANCE, _params(max_tokens=len(got.token_ids), ignore_eos=True))[0]
    assert free.token_ids == got.token_ids and free.finish_reason == "length" and free.stop_reason is None


def test_stop_strings_need_a_tokenizer(llm):
    engine = Engine(llm.loaded.model, EngineConfig(num_kv_blocks=8))
    with pytest.raises(ValueError, match="stop strings.*tokenizer"):
        engine.add_request([1, 2, 3], SamplingParams(temperature=0, stop=["x"]))
    assert not engine.has_unfinished()
    engine.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=2))  # no stop strings: fine
    assert [out.finished for out in engine.run()] == [False, True]


def test_detokenizer_alone_on_the_model_output(llm, free_run):
    """The detokenizer, fed the free run's ids one by one, cuts where the engine does."""
    text, ids, ends = free_run
    stop = _spanning_stop(text, ends)
    expected_text, expected_ids, _ = _expected_cut(text, ends, ids, stop)
    detok = IncrementalDetokenizer(llm.tokenizer, llm.tokenizer.encode(EXPLAIN), skip_special_tokens=True, stop=[stop])
    deltas, pushed = [], 0
    while not detok.is_stopped:
        deltas.append(detok.push(ids[pushed]))
        pushed += 1
    assert pushed == len(expected_ids) and detok.stop_match == stop
    assert "".join(deltas) + detok.flush() == expected_text


def test_stop_strings_match_transformers_stop_strings(llm, free_run, hf_smollm2):
    """transformers' generate(stop_strings=...) returns the tokens up to the one completing the match."""
    import torch

    model, tok = hf_smollm2
    text, ids, ends = free_run
    stop = _spanning_stop(text, ends)
    prompt = torch.tensor([llm.tokenizer.encode(EXPLAIN)])
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False,
        stop_strings=[stop], tokenizer=tok,
    )
    ours = llm.generate(EXPLAIN, _params(max_tokens=40, ignore_eos=True, stop=[stop]))[0]
    assert out[0, prompt.shape[1] :].tolist() == ours.token_ids
