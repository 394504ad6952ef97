"""The one thread that owns an Engine (L5).

Every other thread talks to it through messages: adds and aborts go into one input queue; each
request's outputs come back through its own sink (an asyncio.Queue filled with
`loop.call_soon_threadsafe`, or a plain queue for synchronous code). The loop drains the input queue,
steps while work exists and sleeps on the queue when idle, so an abort takes effect before the next
step and an idle server costs nothing.

    HTTP handler --prepare (checks, tokens)--> PreparedRequest --queue--> engine thread --step()-->
         ^                                                                      |
         +------ per-request asyncio.Queue <--- loop.call_soon_threadsafe <-----+
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from tokenloom.engine.engine import Engine, PreparedRequest
from tokenloom.engine.sequence import FinishReason
from tokenloom.outputs import RequestOutput
from tokenloom.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (shut down, or the engine itself broke): it takes no requests."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot the loop publishes after every step (read from any thread without locking)."""

    num_running: int = 0
    num_waiting: int = 0
    num_kv_blocks: int = 0
    num_free_kv_blocks: int = 0
    num_steps: int = 0
    num_failed_steps: int = 0
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache at admission
    prefix_cache_hits: int = 0  # of those, tokens whose KV came from the cache
    spec_decode_num_drafts: int = 0  # speculating rows verified (one row, one step)
    spec_decode_num_draft_tokens: int = 0  # tokens proposed by speculative decoding
    spec_decode_num_accepted_tokens: int = 0  # of those, tokens the model accepted

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prompt tokens found in the prefix cache / looked up, 0 before any lookup."""
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    @property
    def spec_decode_acceptance_rate(self) -> float:
        """Accepted / proposed speculative tokens, 0 before any proposal."""
        return self.spec_decode_num_accepted_tokens / self.spec_decode_num_draft_tokens \
            if self.spec_decode_num_draft_tokens else 0.0

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the KV pool in use, 0..1."""
        return 1.0 - self.num_free_kv_blocks / self.num_kv_blocks if self.num_kv_blocks else 0.0


@dataclass
class _Sink:
    """Where one request's outputs go: `put(out)`, called in `loop`'s thread when loop is set."""

    put: Callable[[RequestOutput], None]
    loop: asyncio.AbstractEventLoop | None = None


_STOP = object()


class AsyncEngine:
    """Owns `engine` in one background thread; safe to use from any thread and from asyncio.

    `max_consecutive_failed_steps`: after that many steps in a row that failed every request they
    touched, the engine counts as broken (`is_healthy` False), though it goes on trying."""

    def __init__(self, engine: Engine, *, max_consecutive_failed_steps: int = 3, name: str = "tokenloom-engine") -> None:
        self.engine = engine
        self.max_consecutive_failed_steps = max_consecutive_failed_steps
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}  # loop thread only
        self._stats = EngineStats(num_kv_blocks=engine.block_manager.num_blocks,
                                  num_free_kv_blocks=engine.block_manager.num_free_blocks)
        self._consecutive_failures = 0
        self._num_failed_steps = 0
        self._error: BaseException | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- any thread -----------------------------------------------------------------------
    def prepare(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
        detokenize: bool = True,
    ) -> PreparedRequest:
        """Check and prepare a request in the caller's thread (see `Engine.prepare_request`): a bad
        request raises here and never reaches the loop."""
        return self.engine.prepare_request(prompt_token_ids, params, request_id, detokenize)

    def submit(self, prepared: PreparedRequest, sink: Callable[[RequestOutput], None],
               loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Queue `prepared`; its outputs go to `sink` (called in `loop`'s thread when given, else in
        the engine thread: it must then be quick and never block). A request the loop cannot take
        (its id is in use, the loop has stopped) gets one finished output with finish_reason "error"."""
        if self._stopped.is_set():
            raise EngineDeadError(self._dead_message())
        self._inbox.put(("add", prepared, _Sink(sink, loop)))

    def abort(self, request_id: str) -> None:
        """Abort a request: a message that the loop handles before its next step. Its stream ends
        with a finish_reason "abort" output; unknown or finished ids are ignored."""
        self._inbox.put(("abort", request_id))

    def abort_all(self) -> None:
        """Abort every queued and running request (e.g. on shutdown)."""
        self._inbox.put(("abort_all",))

    def call(self, fn: Callable[[Engine], Any], timeout: float | None = None) -> Any:
        """Run `fn(engine)` in the engine thread between two steps and return its result: the way to
        look at or change the engine while the loop owns it."""
        return self._call_future(fn).result(timeout)

    async def call_async(self, fn: Callable[[Engine], Any]) -> Any:
        return await asyncio.wrap_future(self._call_future(fn))

    async def generate(self, prepared: PreparedRequest) -> AsyncIterator[RequestOutput]:
        """Queue `prepared` and yield its outputs as the engine produces them. Closing the iterator
        early (a client that went away, a cancelled task) aborts the request."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.submit(prepared, outputs.put_nowait, loop)
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(prepared.request_id)

    def stream(self, prepared: Iterable[PreparedRequest], timeout: float | None = None) -> Iterator[RequestOutput]:
        """Queue several prepared requests and yield their outputs (interleaved) from synchronous code
        until all have finished. Closing the iterator early aborts those still running."""
        requests = list(prepared)
        outputs: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        pending = {p.request_id for p in requests}
        try:
            for p in requests:
                self.submit(p, outputs.put)
            while pending:
                try:
                    out = outputs.get(timeout=timeout)
                except queue.Empty:
                    raise TimeoutError(f"no output from the engine within {timeout}s") from None
                if out.finished:
                    pending.discard(out.request_id)
                yield out
        finally:
            for request_id in pending:
                self.abort(request_id)

    @property
    def stats(self) -> EngineStats:
        return self._stats

    @property
    def is_running(self) -> bool:
        return not self._stopped.is_set()

    @property
    def is_healthy(self) -> bool:
        """False once the loop has stopped or steps keep failing every request they touch."""
        return self.is_running and self._consecutive_failures < self.max_consecutive_failed_steps

    @property
    def error(self) -> BaseException | None:
        """What stopped the loop, if the engine itself broke."""
        return self._error

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Abort everything, stop the loop and wait for its thread."""
        if self._thread.is_alive():
            self._inbox.put(("abort_all",))
            self._inbox.put(_STOP)
            self._thread.join(timeout)

    def _call_future(self, fn: Callable[[Engine], Any]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._stopped.is_set():
            future.set_exception(EngineDeadError(self._dead_message()))
        else:
            self._inbox.put(("call", fn, future))
        return future

    def _dead_message(self) -> str:
        if self._error is not None:
            return f"the engine loop stopped after an error: {type(self._error).__name__}: {self._error}"
        return "the engine loop has been shut down"

    # ---- the engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                # Sleep on the queue when there is nothing to compute; otherwise only drain it.
                messages = [self._inbox.get()] if not self.engine.has_unfinished() else []
                while True:
                    try:
                        messages.append(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                if not self._handle(messages):
                    return
                if self.engine.has_unfinished():
                    self._step()
        except BaseException as exc:  # the engine itself broke: fail everyone, take nothing more
            self._error = exc
            logger.critical("the engine loop stopped: %s: %s", type(exc).__name__, exc, exc_info=exc)
        finally:
            self._stopped.set()
            self._close_all()

    def _handle(self, messages: list[Any]) -> bool:
        for message in messages:
            if message is _STOP:
                return False
            kind = message[0]
            if kind == "add":
                _, prepared, sink = message
                try:
                    self.engine.enqueue(prepared)
                except Exception as exc:  # refused (an id in use) or failed: this request only
                    self._deliver([(sink, _failed(prepared.request_id, prepared.seq.prompt_token_ids, exc))])
                    continue
                self._sinks[prepared.request_id] = sink
            elif kind == "abort":
                self._abort(message[1])
            elif kind == "abort_all":
                for request_id in list(self._sinks):
                    self._abort(request_id)
            elif kind == "call":
                _, fn, future = message
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(self.engine))
                    except BaseException as exc:
                        future.set_exception(exc)
        self._publish()
        return True

    def _abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        sink = self._sinks.pop(request_id, None)
        if sink is not None:
            self._deliver([(sink, RequestOutput(request_id, [], finished=True, finish_reason=FinishReason.ABORT.value))])

    def _step(self) -> None:
        outputs = self.engine.step()
        failed = sum(1 for out in outputs if out.error is not None)
        if failed:
            self._num_failed_steps += 1
        if failed and failed == len(outputs):
            self._consecutive_failures += 1
        elif outputs:
            self._consecutive_failures = 0
        routed = []
        for out in outputs:
            sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
            if sink is not None:
                routed.append((sink, out))
        self._deliver(routed)
        self._publish(steps=1)

    def _deliver(self, routed: list[tuple[_Sink, RequestOutput]]) -> None:
        """Hand outputs to their sinks: one call_soon_threadsafe per event loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Sink, RequestOutput]]] = {}
        for sink, out in routed:
            if sink.loop is None:
                try:
                    sink.put(out)
                except Exception:
                    logger.exception("an output sink failed for request %s", out.request_id)
            else:
                by_loop.setdefault(sink.loop, []).append((sink, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody will read these requests
                for _, out in items:
                    if not out.finished:
                        self._abort(out.request_id)

    def _publish(self, steps: int = 0) -> None:
        scheduler, blocks, spec = self.engine.scheduler, self.engine.block_manager, self.engine.speculative_stats
        previous = self._stats
        self._stats = EngineStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            num_kv_blocks=blocks.num_blocks,
            num_free_kv_blocks=blocks.num_free_blocks,
            num_steps=previous.num_steps + steps,
            num_failed_steps=self._num_failed_steps,
            prefix_cache_queries=blocks.prefix_cache_stats.queries,
            prefix_cache_hits=blocks.prefix_cache_stats.hits,
            spec_decode_num_drafts=spec.num_verified_rows,
            spec_decode_num_draft_tokens=spec.num_proposed_tokens,
            spec_decode_num_accepted_tokens=spec.num_accepted_tokens,
        )

    def _close_all(self) -> None:
        """After the loop ends: every request still open gets a final output, queued calls fail."""
        reason = self._error
        for request_id, sink in list(self._sinks.items()):
            try:
                self.engine.abort(request_id)
            except Exception:  # a broken engine: its state no longer matters
                logger.debug("abort of %s after the loop stopped failed", request_id, exc_info=True)
            out = (RequestOutput(request_id, [], finished=True, finish_reason=FinishReason.ABORT.value)
                   if reason is None else _failed(request_id, [], reason))
            self._deliver([(sink, out)])
        self._sinks.clear()
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                break
            if message is _STOP:
                continue
            if message[0] == "add":
                _, prepared, sink = message
                self._deliver([(sink, _failed(prepared.request_id, [], EngineDeadError(self._dead_message())))])
            elif message[0] == "call":
                message[2].set_exception(EngineDeadError(self._dead_message()))


def _put_all(items: list[tuple[_Sink, RequestOutput]]) -> None:
    for sink, out in items:
        sink.put(out)


def _failed(request_id: str, prompt: list[int], exc: BaseException) -> RequestOutput:
    return RequestOutput(
        request_id, prompt, finished=True, finish_reason=FinishReason.ERROR.value,
        error=f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc), exception=exc,
    )
