"""The engine loop: one thread owns the Engine; adds, aborts and outputs travel through queues."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from tests.tiny_models import engine_greedy
from tokenloom import AutoModelForCausalLM, SamplingParams
from tokenloom.config import EngineConfig
from tokenloom.engine.async_engine import AsyncEngine, EngineDeadError
from tokenloom.engine.engine import Engine, RequestFailedError

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [3, 4, 5, 6, 7, 8], [20], [30, 31]]


def greedy(n: int = 10) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=2, pad_token_id=0,
    )
    path = tmp_path_factory.mktemp("tiny_async")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(model_path):
    return AutoModelForCausalLM.from_pretrained(str(model_path)).causal_lm


@pytest.fixture(scope="module")
def expected(model):
    return engine_greedy(Engine(model), PROMPTS, 10)


def _idle(engine: Engine) -> bool:
    bm = engine.block_manager
    return not engine.has_unfinished() and bm.num_free_blocks == bm.num_blocks


@pytest.fixture
def loop_engine(model):
    engine = AsyncEngine(Engine(model, EngineConfig(num_kv_blocks=64)))
    yield engine
    engine.shutdown()


def test_concurrent_async_streams_equal_the_batched_engine(loop_engine, expected):
    async def one(prompt: list[int]) -> tuple[list[int], int]:
        outputs = [out async for out in loop_engine.generate(loop_engine.prepare(prompt, greedy()))]
        assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
        return outputs[-1].token_ids, len(outputs)

    async def main():
        ticks = 0
        task = asyncio.gather(*(one(p) for p in PROMPTS))
        while not task.done():  # the event loop keeps running while the engine thread computes
            ticks += 1
            await asyncio.sleep(0)
        return await task, ticks

    results, ticks = asyncio.run(main())
    assert [tokens for tokens, _ in results] == expected
    assert all(count == 10 for _, count in results)  # one output per token
    assert ticks > 10
    assert loop_engine.call(_idle)


def test_the_loop_sleeps_when_idle(loop_engine):
    list(loop_engine.stream([loop_engine.prepare([5, 6], greedy(3))]))
    before = loop_engine.stats.num_steps
    time.sleep(0.3)
    assert loop_engine.stats.num_steps == before  # no step without work
    assert loop_engine.stats.num_running == loop_engine.stats.num_waiting == 0
    assert loop_engine.stats.kv_cache_usage == 0.0


def test_abort_from_another_thread_takes_effect_before_the_next_step(loop_engine):
    prepared = loop_engine.prepare([5, 6, 7], greedy(200))
    before = loop_engine.stats.num_steps
    outputs = []
    steps_at_abort = None
    for out in loop_engine.stream([prepared]):
        outputs.append(out)
        if len(outputs) == 2:
            # the abort arrives as a message, sent from another thread (joined: it is in the inbox now)
            sender = threading.Thread(target=loop_engine.abort, args=(prepared.request_id,))
            sender.start()
            sender.join()
            steps_at_abort = loop_engine.stats.num_steps
    assert outputs[-1].finish_reason == "abort" and outputs[-1].finished
    assert steps_at_abort is not None
    # one output per step, then the abort's: only the step already running when the message arrived
    # may still add a token (the engine runs ahead of this reader, so count steps, not reads)
    assert len(outputs) <= steps_at_abort - before + 2
    assert len(outputs) < 200
    assert loop_engine.call(_idle)


def test_closing_an_async_stream_aborts_its_request(loop_engine):
    async def main():
        stream = loop_engine.generate(loop_engine.prepare([5, 6, 7], greedy(200)))
        first = await anext(stream)
        assert not first.finished
        await stream.aclose()

    asyncio.run(main())
    deadline = time.monotonic() + 10
    while not loop_engine.call(_idle) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loop_engine.call(_idle)


def test_a_cancelled_task_leaves_nothing_queued(loop_engine):
    async def main():
        task = asyncio.ensure_future(anext(loop_engine.generate(loop_engine.prepare([5, 6, 7], greedy(200)))))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    deadline = time.monotonic() + 10
    while not loop_engine.call(_idle) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loop_engine.call(_idle)


def test_a_bad_request_is_refused_in_the_callers_thread(loop_engine):
    steps = loop_engine.stats.num_steps
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 97\).*500"):
        loop_engine.prepare([5, 500], greedy())
    with pytest.raises(ValueError, match="context length"):
        loop_engine.prepare(list(range(1, 90)) * 3, greedy())
    assert loop_engine.stats.num_steps == steps


def test_a_request_id_in_use_gets_an_error_output(loop_engine):
    first = loop_engine.prepare([5, 6], greedy(50), request_id="same")
    second = loop_engine.prepare([7, 8], greedy(5), request_id="same")
    running = loop_engine.stream([first])
    assert not next(running).finished
    (error,) = loop_engine.stream([second])
    assert error.finish_reason == "error" and "request_id 'same' is already in use" in error.error
    rest = list(running)  # the first request is untouched by the refusal
    assert rest[-1].finish_reason == "length" and len(rest[-1].token_ids) == 50
    assert loop_engine.call(_idle)


def test_a_failing_step_fails_only_the_requests_it_touched(model, expected):
    """max_num_seqs=2: the first step computes two requests and raises; the third request (waiting,
    untouched) and a later one are served with their correct outputs, and every block comes back."""
    engine = Engine(model, EngineConfig(num_kv_blocks=64, max_num_seqs=2))
    real_step = engine.runner.step
    calls = {"n": 0}

    def failing_step(out):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected failure")
        return real_step(out)

    engine.runner.step = failing_step
    loop_engine = AsyncEngine(engine)
    try:
        prepared = [loop_engine.prepare(p, greedy()) for p in PROMPTS[:3]]
        final = {o.request_id: o for o in loop_engine.stream(prepared) if o.finished}
        a, b, c = (final[p.request_id] for p in prepared)
        assert a.finish_reason == b.finish_reason == "error"
        assert "injected failure" in a.error and isinstance(a.exception, RuntimeError)
        assert c.finish_reason == "length" and c.token_ids == expected[2]
        later = [o for o in loop_engine.stream([loop_engine.prepare(PROMPTS[3], greedy())]) if o.finished]
        assert later[0].token_ids == expected[3]
        assert loop_engine.call(_idle) and loop_engine.is_healthy
        assert loop_engine.stats.num_failed_steps == 1
    finally:
        loop_engine.shutdown()


def test_a_failing_step_raises_for_the_synchronous_faces(model):
    engine = Engine(model, EngineConfig(num_kv_blocks=64))

    def broken(out):
        raise RuntimeError("injected failure")

    engine.runner.step = broken
    request_id = engine.add_request([5, 6, 7], greedy())
    with pytest.raises(RequestFailedError, match="injected failure") as info:
        list(engine.stream([request_id]))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert _idle(engine)


def test_steps_that_keep_failing_make_the_engine_unhealthy(model):
    engine = Engine(model, EngineConfig(num_kv_blocks=64))

    def broken(out):
        raise RuntimeError("the device is gone")

    engine.runner.step = broken
    loop_engine = AsyncEngine(engine, max_consecutive_failed_steps=2)
    try:
        for _ in range(2):
            (out,) = loop_engine.stream([loop_engine.prepare([5, 6], greedy())])
            assert out.finish_reason == "error"
        assert loop_engine.is_running and not loop_engine.is_healthy
    finally:
        loop_engine.shutdown()


def test_a_broken_engine_stops_the_loop_and_fails_everyone(model):
    engine = Engine(model, EngineConfig(num_kv_blocks=64))
    gate = threading.Event()

    def broken_schedule():
        gate.wait(5)
        raise RuntimeError("scheduler state corrupted")

    engine.scheduler.schedule = broken_schedule
    loop_engine = AsyncEngine(engine)
    stream = loop_engine.stream([loop_engine.prepare([5, 6], greedy())])
    gate.set()
    (out,) = list(stream)
    assert out.finish_reason == "error" and "scheduler state corrupted" in out.error
    loop_engine._thread.join(5)
    assert not loop_engine.is_running and not loop_engine.is_healthy
    with pytest.raises(EngineDeadError, match="scheduler state corrupted"):
        loop_engine.submit(loop_engine.prepare([5, 6], greedy()), print)
    with pytest.raises(EngineDeadError):
        loop_engine.call(_idle)


def test_shutdown_aborts_what_is_running(model):
    loop_engine = AsyncEngine(Engine(model, EngineConfig(num_kv_blocks=64)))
    stream = loop_engine.stream([loop_engine.prepare([5, 6], greedy(200))])
    assert not next(stream).finished
    loop_engine.shutdown()
    rest = list(stream)
    assert rest[-1].finish_reason == "abort"
    assert _idle(loop_engine.engine) and not loop_engine.is_running
