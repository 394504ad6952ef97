"""Streaming text: engine deltas, transformers-style streamers (against transformers' own, fed the same
tokens), batch streaming, and the async faces."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from tests.prompts import GREEDY_PROMPTS
from tokenloom import (
    LLM,
    AsyncTextIteratorStreamer,
    AutoModelForCausalLM,
    AutoTokenizer,
    SamplingParams,
    TextIteratorStreamer,
    TextStreamer,
)

transformers = pytest.importorskip("transformers")


def chat(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


# Prompts whose greedy answers are Chinese, Japanese or emoji: characters split across tokens.
MULTIBYTE_PROMPTS = [
    chat("用中文回答：你好吗？"),
    chat("Reply with only emoji: 😀🎉"),
    chat("Translate to Chinese: good morning"),
    chat("Write 'I love you' in Japanese."),
    chat("用中文写一句关于大海的诗。"),
    chat("Give me three emoji about the weather ☀️🌧️"),
    "人工智能是",
    "I love pizza 🍕 because",
    "日本の首都は",
    "🚀🚀🚀 launch in",
]
PROMPTS = MULTIBYTE_PROMPTS + GREEDY_PROMPTS[:10]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


@pytest.fixture(scope="module")
def llm(smollm2_gguf, one_torch_thread) -> LLM:
    return LLM(str(smollm2_gguf), dtype="float32")  # decode-vs-prefill logits to 1e-4


@pytest.fixture(scope="module")
def model(smollm2_gguf, one_torch_thread):
    return AutoModelForCausalLM.from_pretrained(str(smollm2_gguf))


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    return AutoTokenizer.from_pretrained(str(smollm2_gguf))


@pytest.fixture(scope="module")
def hf_tok(smollm2_gguf):
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


def test_stream_deltas_join_to_the_final_text(llm):
    engine = llm.engine
    request_ids = engine.add_requests([(llm.tokenizer.encode(p), GREEDY) for p in PROMPTS])
    deltas: dict[str, list[str]] = {rid: [] for rid in request_ids}
    finals = {}
    for out in engine.stream(request_ids):
        deltas[out.request_id].append(out.text_delta)
        assert out.text == "".join(deltas[out.request_id])
        if out.finished:
            finals[out.request_id] = out
    split_characters = 0
    for rid in request_ids:
        final = finals[rid]
        assert "".join(deltas[rid]) == final.text == llm.tokenizer.decode(final.token_ids, skip_special_tokens=True)
        # A character split across tokens is never released in pieces (at the very end of a stream
        # cut by max_tokens an incomplete one decodes as U+FFFD, as in a full decode).
        for delta in deltas[rid][:-1]:
            assert not delta.endswith("\ufffd")
        split_characters += sum("\ufffd" in llm.tokenizer.decode([t]) for t in final.token_ids)
    assert split_characters > 20, "the prompts must make the model write characters split across tokens"
    assert sum(any(ord(c) > 0x2E80 for c in finals[rid].text) for rid in request_ids) >= 4


def _feed(streamer, prompt_ids: list[int], new_ids: list[int]) -> None:
    """What generate() does with a streamer, for a batch of one."""
    streamer.put(torch.tensor([prompt_ids]))
    for token_id in new_ids:
        streamer.put(torch.tensor([token_id]))
    streamer.end()


@pytest.mark.parametrize("prompt", [chat("Explain why the sky is blue."), *MULTIBYTE_PROMPTS[:2]])
@pytest.mark.parametrize("skip_prompt", [True, False])
def test_text_streamer_prints_what_transformers_prints(model, tok, hf_tok, capsys, prompt, skip_prompt):
    inputs = tok(prompt, return_tensors="pt")
    out = model.generate(
        **inputs, max_new_tokens=30, do_sample=False,
        streamer=TextStreamer(tok, skip_prompt=skip_prompt, skip_special_tokens=True),
    )
    ours = capsys.readouterr().out
    width = inputs["input_ids"].shape[1]
    _feed(transformers.TextStreamer(hf_tok, skip_prompt=skip_prompt, skip_special_tokens=True),
          inputs["input_ids"][0].tolist(), out[0, width:].tolist())
    assert ours == capsys.readouterr().out
    # the engine tokenizer works the same way
    _feed(TextStreamer(tok.engine_tokenizer, skip_prompt=skip_prompt, skip_special_tokens=True),
          inputs["input_ids"][0].tolist(), out[0, width:].tolist())
    assert ours == capsys.readouterr().out


def _consume(streamer, into: list) -> threading.Thread:
    thread = threading.Thread(target=lambda: into.extend(streamer))
    thread.start()
    return thread


@pytest.mark.parametrize("prompt", [chat("Explain why the sky is blue."), MULTIBYTE_PROMPTS[0], MULTIBYTE_PROMPTS[1]])
def test_text_iterator_streamer_with_a_thread(model, tok, hf_tok, prompt):
    inputs = tok(prompt, return_tensors="pt")
    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=60, skip_special_tokens=True)
    result: dict[str, torch.Tensor] = {}
    thread = threading.Thread(
        target=lambda: result.update(out=model.generate(**inputs, max_new_tokens=30, do_sample=False, streamer=streamer))
    )
    thread.start()
    pieces = list(streamer)
    thread.join()
    new_ids = result["out"][0, inputs["input_ids"].shape[1] :].tolist()
    reference = transformers.TextIteratorStreamer(hf_tok, skip_prompt=True, skip_special_tokens=True)
    expected: list[str] = []
    consumer = _consume(reference, expected)
    _feed(reference, inputs["input_ids"][0].tolist(), new_ids)
    consumer.join()
    assert "".join(pieces) == "".join(expected) == tok.decode(new_ids, skip_special_tokens=True)
    assert all(pieces)
    if "sky" in prompt:  # text with spaces comes word by word (emoji-only text has no word boundary)
        assert len(pieces) > 5
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])  # only a cut-off last character may be


BATCH = [chat("用中文回答：你好吗？"), "The capital of France is", chat("Reply with only emoji: 😀🎉")]


def test_batch_streaming_through_generate(model, tok):
    """transformers' streamers refuse batches; these stream each row."""
    inputs = tok(BATCH, return_tensors="pt", padding=True, padding_side="left")
    width = inputs["input_ids"].shape[1]
    for skip_prompt in (True, False):
        streamer = TextIteratorStreamer(tok, skip_prompt=skip_prompt, timeout=60, skip_special_tokens=True)
        pieces: list[tuple[int, str]] = []
        consumer = _consume(streamer, pieces)
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False, streamer=streamer)
        consumer.join()
        assert all(isinstance(p, tuple) for p in pieces)
        for row in range(len(BATCH)):
            text = "".join(t for r, t in pieces if r == row)
            ids = out[row, width:] if skip_prompt else out[row]
            assert text == tok.decode(ids, skip_special_tokens=True)
        assert len({r for r, _ in pieces}) == len(BATCH)


def test_streaming_several_return_sequences(model, tok):
    """num_return_sequences > 1: the streamer's rows are the output rows (each prompt row repeated)."""
    inputs = tok(BATCH[:2], return_tensors="pt", padding=True, padding_side="left")
    width = inputs["input_ids"].shape[1]
    streamer = TextIteratorStreamer(tok, skip_prompt=False, timeout=60, skip_special_tokens=True)
    pieces: list[tuple[int, str]] = []
    consumer = _consume(streamer, pieces)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=True, seed=3, num_return_sequences=2,
                         streamer=streamer)
    consumer.join()
    assert out.shape[0] == 4
    for row in range(4):
        text = "".join(t for r, t in pieces if r == row)
        assert text == tok.decode(out[row], skip_special_tokens=True)
        assert torch.equal(out[row, :width], inputs["input_ids"][row // 2])


def test_batch_streaming_fed_directly(llm, tok, capsys):
    """Rows interleaved as the engine produces them; TextStreamer prints each row's lines."""
    engine = llm.engine
    prompts = [llm.tokenizer.encode(p) for p in BATCH]
    width = max(len(p) for p in prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    padded = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    request_ids = engine.add_requests([(p, GREEDY) for p in prompts])
    row_of = {rid: row for row, rid in enumerate(request_ids)}
    iterator = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    printer = TextStreamer(llm.tokenizer, skip_prompt=True, skip_special_tokens=True)
    generated: dict[int, list[int]] = {row: [] for row in range(len(prompts))}
    for streamer in (iterator, printer):
        streamer.put(padded)
    for out in engine.stream(request_ids):
        generated[row_of[out.request_id]].extend(out.new_token_ids)
        for streamer in (iterator, printer):
            streamer.put_row(row_of[out.request_id], out.new_token_ids)
    with pytest.raises(ValueError, match="put_row"):
        iterator.put(torch.tensor([5]))
    with pytest.raises(ValueError, match="row must be in"):
        iterator.put_row(len(prompts), [5])
    for streamer in (iterator, printer):
        streamer.end()
    pieces = list(iterator)
    printed = capsys.readouterr().out.splitlines()
    for row, ids in generated.items():
        text = llm.tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(t for r, t in pieces if r == row) == text
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()
        assert [line[len(f"[{row}] ") :] for line in printed if line.startswith(f"[{row}] ")] == lines


def test_async_text_iterator_streamer(model, tok):
    inputs = tok(MULTIBYTE_PROMPTS[0], return_tensors="pt")  # CJK text is released character by character

    async def main() -> tuple[list[str], torch.Tensor]:
        streamer = AsyncTextIteratorStreamer(tok, skip_prompt=True, timeout=60, skip_special_tokens=True)
        task = asyncio.create_task(
            asyncio.to_thread(model.generate, **inputs, max_new_tokens=24, do_sample=False, streamer=streamer)
        )
        pieces = [piece async for piece in streamer]
        return pieces, await task

    pieces, out = asyncio.run(main())
    assert "".join(pieces) == tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(pieces) > 1


def test_async_streamer_times_out(tok):
    async def main() -> None:
        streamer = AsyncTextIteratorStreamer(tok, timeout=0.05)
        with pytest.raises(TimeoutError):
            await anext(streamer)

    asyncio.run(main())


def test_llm_stream_async(llm):
    prompts = [MULTIBYTE_PROMPTS[0], "The capital of France is"]
    expected = llm.generate(prompts, GREEDY)

    async def collect(prompt: str) -> list:
        return [out async for out in llm.stream_async(prompt, GREEDY)]

    async def main() -> tuple[list[list], int]:
        ticks = 0
        streams = asyncio.gather(*(collect(p) for p in prompts))
        while not streams.done():  # the event loop keeps running while the engine steps
            ticks += 1
            await asyncio.sleep(0.001)
        return await streams, ticks

    results, ticks = asyncio.run(main())
    for outputs, completion in zip(results, expected):
        assert "".join(out.text_delta for out in outputs) == completion.text
        assert outputs[-1].token_ids == completion.token_ids and outputs[-1].finished
    assert ticks > len(expected[0].token_ids)
    assert not llm.engine.has_unfinished()


def test_llm_stream_async_closed_early_aborts(llm):
    async def main() -> None:
        stream = llm.stream_async("Once upon a time,", SamplingParams(temperature=0.0, max_tokens=50))
        first = await anext(stream)
        assert not first.finished and llm.engine.has_unfinished()
        await stream.aclose()

    asyncio.run(main())
    # closing sent an abort message; a call queued after it runs once the loop has handled it
    bm = llm.engine.block_manager
    assert llm.async_engine.call(lambda engine: not engine.has_unfinished() and bm.num_free_blocks == bm.num_blocks)


def test_llm_stream_async_cancelled_while_queueing_leaves_nothing_behind(llm):
    """Cancelled before the engine loop took its request: the abort message follows the add, so the
    request is not left queued with no consumer (it would hold KV blocks and keep the engine busy)."""

    async def main() -> None:
        stream = llm.stream_async("Once upon a time,", SamplingParams(temperature=0.0, max_tokens=50))
        task = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)  # the add is queued; the loop has not answered yet
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    idle = lambda engine: not engine.has_unfinished() and not engine._mailbox  # noqa: E731
    deadline = time.monotonic() + 30
    while not llm.async_engine.call(idle) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert llm.async_engine.call(idle)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_step_outputs_carry_the_runner_extras_and_their_own_token_ids(llm):
    """Per-step outputs: logprobs/scores/logits for the new token where the request asked (None
    elsewhere), and token_ids as of that step even when read after generation went on."""
    prompt = llm.tokenizer.encode("The capital of France is")
    asking = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2, output_logits=True,
                            output_scores=True)
    plain = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    rid_a, rid_b = llm.engine.add_requests([(prompt, asking), (prompt, plain)])
    outputs = list(llm.engine.stream([rid_a, rid_b]))
    mine = [out for out in outputs if out.request_id == rid_a]
    other = [out for out in outputs if out.request_id == rid_b]
    final = mine[-1].token_ids
    assert other[-1].token_ids == final  # same greedy continuation
    for step, out in enumerate(mine):
        assert out.token_ids == final[: step + 1]  # read now, after later steps appended tokens
        (token_id,) = out.new_token_ids
        (lp,) = out.logprobs
        (logits,) = out.logits
        (scores,) = out.scores
        assert lp.token_id == token_id and len(lp.top) == 2 and lp.top[0][0] == token_id
        # the raw row is the model's logits at that position, computed again from the whole context
        expected = llm.engine.prompt_logits([prompt + final[:step]])[0][-1]
        assert torch.allclose(logits, expected.float(), atol=1e-4)
        assert int(logits.argmax()) == token_id == int(scores.argmax())
        assert lp.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[token_id]), abs=1e-4)
    for out in other:
        assert out.logprobs is None and out.logits is None and out.scores is None


def test_llm_generate_collects_each_tokens_logprobs(llm):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)
    completion = llm.generate("The capital of France is", params)[0]
    streamed = [lp for out in llm.stream("The capital of France is", params) for lp in out.logprobs]
    assert completion.logprobs == streamed
    assert [lp.token_id for lp in completion.logprobs] == completion.token_ids
    assert all(len(lp.top) == 2 and lp.top[0][1] >= lp.logprob - 1e-6 for lp in completion.logprobs)
    plain = llm.generate("The capital of France is", SamplingParams(temperature=0.0, max_tokens=3))[0]
    assert plain.logprobs is None
