"""Hostile generation inputs (issue 10, items 7 and 8): generate()/forward() refuse float and bool ids,
ragged lists and bad masks with errors naming the argument (and take lists of ints as tensors);
tokenizer.decode refuses ids that are not token ids; a streamer whose consumer stops reading stops the
generation, and the request leaves the engine. A tiny llama written from scratch serves as the model."""

from __future__ import annotations

import asyncio
import threading
import time
from queue import Empty

import numpy as np
import pytest
import torch

from tests.hostile_files import write_tiny_hf_dir
from tokenloom import AsyncTextIteratorStreamer, AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer
from tokenloom.compat.streamers import TextStreamer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LONG = 200  # new tokens a stopped generation never reaches (the tiny model's context is 256)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = write_tiny_hf_dir(tmp_path_factory.mktemp("tiny_llama"))
    return AutoModelForCausalLM.from_pretrained(str(directory), device_map="cpu"), AutoTokenizer.from_pretrained(
        str(directory)
    )


PROMPT = [[5, 6, 7, 8]]


def _greedy(model, ids, **kwargs):
    return model.generate(ids, max_new_tokens=4, do_sample=False, **kwargs)


# ---------------------------------------------------------------- input_ids and attention_mask


def test_lists_of_ints_are_taken_as_tensors(tiny):
    model, _ = tiny
    expected = _greedy(model, torch.tensor(PROMPT))
    assert torch.equal(_greedy(model, PROMPT), expected)
    assert torch.equal(_greedy(model, PROMPT[0]), expected)
    assert torch.equal(_greedy(model, np.array(PROMPT)), expected)
    batch = _greedy(model, [PROMPT[0], [9, 10, 11, 12]])
    assert batch.shape == (2, 8) and torch.equal(batch[:1], expected)
    assert torch.equal(_greedy(model, PROMPT, attention_mask=[[1, 1, 1, 1]]), expected)


@pytest.mark.parametrize(
    ("input_ids", "error", "fragment"),
    [
        (torch.tensor([[5.0, 6.0, 7.5]]), TypeError, "input_ids must hold integer token ids, got a float32 tensor"),
        (torch.tensor([[True, False]]), TypeError, "input_ids must hold integer token ids, got a bool tensor"),
        (np.array([[5.0, 6.0]]), TypeError, "numpy array of float64"),
        ([5, 6.5, 7], TypeError, "input_ids[1] must be an integer token id, got 6.5"),
        ([[5, 6], [7, True]], TypeError, "input_ids[1][1] must be an integer token id, got True"),
        ([[5, 6, 7], [8]], ValueError, "different lengths [1, 3]"),
        ([], ValueError, "input_ids is empty"),
        ("5 6 7", TypeError, "got str"),
        (torch.tensor(5), ValueError, "got shape ()"),
        (torch.zeros(1, 2, 3, dtype=torch.long), ValueError, "got shape (1, 2, 3)"),
        (torch.zeros(1, 0, dtype=torch.long), ValueError, "has no tokens"),
        (torch.tensor([[5, -1]]), ValueError, "token ids >= 0, got -1"),
    ],
)
def test_bad_input_ids_are_refused_naming_the_argument(tiny, input_ids, error, fragment):
    model, _ = tiny
    with pytest.raises(error) as info:
        _greedy(model, input_ids)
    assert fragment in str(info.value)
    with pytest.raises(error):
        model(input_ids)


@pytest.mark.parametrize(
    ("mask", "fragment"),
    [
        (torch.tensor([[1, 1, 2, 1]]), "attention_mask must hold only 0 and 1, got 2"),
        (torch.tensor([[1, 1, 0.5, 1]]), "attention_mask must hold only 0 and 1, got 0.5"),
        (torch.tensor([[1, 1, 1]]), "attention_mask shape (1, 3) does not match input_ids shape (1, 4)"),
        ("1111", "attention_mask must be a tensor"),
        (np.array([["1", "1", "1", "1"]]), "attention_mask must hold 0/1 values, got a numpy array of <U1"),
    ],
)
def test_bad_attention_masks_are_refused(tiny, mask, fragment):
    model, _ = tiny
    with pytest.raises((TypeError, ValueError)) as info:
        _greedy(model, torch.tensor(PROMPT), attention_mask=mask)
    assert fragment in str(info.value)


def test_boolean_and_float_masks_mean_what_they_say(tiny):
    model, _ = tiny
    ids = torch.tensor([[0, 0, 5, 6]])
    ints = _greedy(model, ids, attention_mask=torch.tensor([[0, 0, 1, 1]]))
    assert torch.equal(_greedy(model, ids, attention_mask=torch.tensor([[False, False, True, True]])), ints)
    assert torch.equal(_greedy(model, ids, attention_mask=torch.tensor([[0.0, 0.0, 1.0, 1.0]])), ints)
    reversed_view = np.array([[1, 1, 0, 0]])[:, ::-1]  # negative strides: copied, not refused by torch
    assert torch.equal(_greedy(model, ids, attention_mask=reversed_view), ints)


# ---------------------------------------------------------------- decode


@pytest.mark.parametrize(
    ("ids", "error", "fragment"),
    [
        ([-1], ValueError, "token_ids[0] must be a token id in [0, 2**32), got -1"),
        ([5, 2**32], ValueError, "token_ids[1] must be a token id in [0, 2**32), got 4294967296"),
        ([1.5], TypeError, "token_ids[0] must be an integer token id, got 1.5"),
        ([5, True], TypeError, "token_ids[1] must be an integer token id, got True"),
        (["5"], TypeError, "got '5'"),
        (torch.tensor([1.0, 2.0]), TypeError, "token_ids[0] must be an integer token id, got 1.0"),
        (-1, ValueError, "got -1"),
    ],
)
def test_decode_refuses_what_is_not_a_token_id(tiny, ids, error, fragment):
    _, tokenizer = tiny
    with pytest.raises(error) as info:
        tokenizer.decode(ids)
    assert fragment in str(info.value)
    with pytest.raises(error):
        tokenizer.engine_tokenizer.decode(ids if not isinstance(ids, int) else [ids])


def test_decode_takes_every_kind_of_integer(tiny):
    _, tokenizer = tiny
    expected = tokenizer.decode([5, 6, 7])
    assert expected == "w5 w6 w7"
    assert tokenizer.decode(torch.tensor([5, 6, 7])) == expected
    assert tokenizer.decode(np.array([5, 6, 7], dtype=np.int32)) == expected
    assert tokenizer.decode([np.int64(5), 6, torch.tensor(7)]) == expected
    assert tokenizer.decode([5, 10**6]) == "w5", "ids past the vocabulary decode to nothing, as in transformers"


# ---------------------------------------------------------------- streamers stop the generation


def _engine_is_idle(model) -> None:
    engine = model.engine
    assert not engine.has_unfinished() and engine.num_unfinished == 0
    assert not engine._sequences and not engine._detokenizers and not engine._mailbox
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def _generate_in_thread(model, streamer, result: dict) -> threading.Thread:
    def run() -> None:
        result["out"] = model.generate(torch.tensor(PROMPT), max_new_tokens=LONG, min_new_tokens=LONG,
                                       do_sample=False, streamer=streamer)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


class _Gated:
    """Holds generate() after its third put() (the prompt and two steps) until `release` is set."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.puts = 0
        self.release = threading.Event()

    def put(self, value) -> None:
        super().put(value)
        self.puts += 1
        if self.puts == 3:
            assert self.release.wait(30)


class GatedIterator(_Gated, TextIteratorStreamer):
    pass


class GatedAsync(_Gated, AsyncTextIteratorStreamer):
    pass


def _new_tokens(result: dict) -> int:
    return result["out"].shape[1] - len(PROMPT[0])


def test_closing_the_iterator_stops_the_generation(tiny):
    model, tokenizer = tiny
    streamer = GatedIterator(tokenizer, skip_prompt=True, timeout=30)
    result: dict = {}
    thread = _generate_in_thread(model, streamer, result)
    first = next(streamer)
    assert first
    streamer.close()
    streamer.release.set()
    thread.join(30)
    assert not thread.is_alive()
    assert list(streamer) == []
    assert 2 <= _new_tokens(result) < 5, "generate stopped right after the consumer left"
    _engine_is_idle(model)


def test_an_explicit_stop_stops_the_generation(tiny):
    model, tokenizer = tiny

    class StopAfterThree(TextStreamer):
        pieces = 0

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            self.pieces += 1
            if self.pieces == 3:
                self.stop()

    streamer = StopAfterThree(tokenizer, skip_prompt=True)
    out = model.generate(torch.tensor(PROMPT), max_new_tokens=LONG, min_new_tokens=LONG, do_sample=False,
                         streamer=streamer)
    assert out.shape[1] - len(PROMPT[0]) < 10
    _engine_is_idle(model)
    # the stop was for that generation only: the next one runs to its length (a fresh streamer)
    assert model.generate(torch.tensor(PROMPT), max_new_tokens=6, min_new_tokens=6, do_sample=False).shape[1] == 10


def test_a_consumer_timeout_stops_the_generation(tiny):
    """The consumer waited `timeout` for the next piece and got queue.Empty: the generation stops."""
    model, tokenizer = tiny
    streamer = GatedIterator(tokenizer, skip_prompt=True, timeout=0.3)
    result: dict = {}
    thread = _generate_in_thread(model, streamer, result)
    pieces = []
    with pytest.raises(Empty):
        while True:
            pieces.append(next(streamer))  # two pieces, then nothing while generate() is held
    assert streamer.stop_requested
    streamer.release.set()
    thread.join(30)
    assert not thread.is_alive() and _new_tokens(result) < 5
    _engine_is_idle(model)


def test_text_left_unread_past_the_timeout_stops_the_generation(tiny):
    """A consumer that simply stops reading (no close, no timeout of its own): the text waits unread
    longer than `timeout`, and generate() stops at its next step."""
    model, tokenizer = tiny

    class SlowSteps(TextIteratorStreamer):
        puts = 0

        def put(self, value) -> None:
            super().put(value)
            self.puts += 1
            if self.puts > 2:
                time.sleep(0.05)

    streamer = SlowSteps(tokenizer, skip_prompt=True, timeout=0.2)
    with pytest.warns(RuntimeWarning, match=r"waited unread for more than timeout=0.2 s"):  # never silent
        out = model.generate(torch.tensor(PROMPT), max_new_tokens=LONG, min_new_tokens=LONG, do_sample=False,
                             streamer=streamer)  # nobody reads: this thread is the only one
    assert streamer.stop_requested
    assert out.shape[1] - len(PROMPT[0]) < LONG // 2
    _engine_is_idle(model)


def test_closing_an_async_streamer_stops_the_generation(tiny):
    model, tokenizer = tiny

    async def main() -> tuple[str, dict]:
        streamer = GatedAsync(tokenizer, skip_prompt=True, timeout=30)
        result: dict = {}
        task = asyncio.create_task(asyncio.to_thread(
            lambda: result.update(out=model.generate(torch.tensor(PROMPT), max_new_tokens=LONG,
                                                     min_new_tokens=LONG, do_sample=False, streamer=streamer))
        ))
        first = await anext(streamer)
        await streamer.aclose()
        streamer.release.set()
        await task
        with pytest.raises(StopAsyncIteration):
            await anext(streamer)
        return first, result

    first, result = asyncio.run(main())
    assert first and _new_tokens(result) < 5
    _engine_is_idle(model)
