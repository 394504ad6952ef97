"""What every route shares (L6): the engine loop client, limits, admission (429), request tracing
(one log line and the metrics per request) and the helpers that tie a request to its client."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokenloom.engine.async_engine import AsyncEngine, EngineDeadError
from tokenloom.engine.engine import PreparedRequest
from tokenloom.outputs import RequestOutput
from tokenloom.sampling_params import ParameterError, SamplingParams
from tokenloom.serving.config import ServerConfig
from tokenloom.serving.errors import ApiError

if TYPE_CHECKING:
    from starlette.requests import Request

    from tokenloom.llm import LLM
    from tokenloom.serving.metrics import Metrics

logger = logging.getLogger("tokenloom.serving")


class Admission:
    """At most `max_running` requests at once; up to `max_queue` more wait for a slot (FIFO); the
    rest are refused with 429 and Retry-After. Lives in the event loop's thread."""

    def __init__(self, max_running: int, max_queue: int) -> None:
        self.max_running = max_running
        self.max_queue = max_queue
        self.running = 0
        self.queued = 0
        self._slots = asyncio.Semaphore(max_running)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.running + self.queued >= self.max_running + self.max_queue:
            raise ApiError(
                429, f"the server is at its limit of {self.max_running} concurrent requests and {self.max_queue} "
                "queued ones; retry later", code="too_many_requests", headers={"Retry-After": "1"},
            )
        self.queued += 1
        try:
            await self._slots.acquire()
        finally:
            self.queued -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()


@dataclass
class Trace:
    """One HTTP request's life, for its log line and the metrics."""

    request_id: str
    route: str
    received: float = field(default_factory=time.monotonic)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens the prefix cache supplied (the most of any choice)
    first_token: float | None = None
    queue_time: float | None = None
    finish_reasons: list[str] = field(default_factory=list)
    inter_token: list[float] = field(default_factory=list)
    last_token: dict[int, float] = field(default_factory=dict)  # per engine request (choice)

    def saw(self, index: int, out: RequestOutput) -> None:
        now = time.monotonic()
        if out.new_token_ids:
            if self.first_token is None:
                self.first_token = now
            if index in self.last_token:
                self.inter_token.append(now - self.last_token[index])
            self.last_token[index] = now
            self.num_output_tokens += len(out.new_token_ids)
        if out.finished:
            self.finish_reasons.append(out.finish_reason or "unknown")
            if out.metrics is not None:
                self.num_cached_tokens = max(self.num_cached_tokens, out.metrics.num_cached_tokens)
                if out.metrics.queue_time is not None:
                    self.queue_time = max(self.queue_time or 0.0, out.metrics.queue_time)


class ServingContext:
    """The loaded model behind the routes."""

    def __init__(self, llm: LLM, config: ServerConfig, metrics: Metrics | None = None) -> None:
        self.llm = llm
        self.config = config
        self.tokenizer = llm.tokenizer
        self._special_ids = set(llm.tokenizer.special_token_ids)
        self.engine: AsyncEngine = llm.async_engine
        self.model_name = config.served_model_name
        context = llm.engine.max_model_len
        self.max_total_tokens = min(config.max_total_tokens or context, context)
        self.max_input_tokens = min(config.max_input_tokens or self.max_total_tokens - 1, self.max_total_tokens - 1)
        self.admission = Admission(config.max_concurrent_requests, config.max_queue)
        self.metrics = metrics
        self.created = int(time.time())
        self._ids = itertools.count()

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{int(time.time() * 1000):x}{next(self._ids):04x}"

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    def max_tokens_for(self, num_prompt: int, max_tokens: int | None, param: str, default: int | None = None) -> int:
        """The request's max new tokens, checked against the context and the server's limits (400 with
        the numbers). None takes `default`, or whatever room the context leaves."""
        if num_prompt > self.max_input_tokens:
            raise ApiError(400, f"the prompt has {num_prompt} tokens; this server takes at most {self.max_input_tokens} "
                           "input tokens (--max-input-tokens / the model's context length)", param="prompt",
                           code="context_length_exceeded")
        room = self.max_total_tokens - num_prompt
        if max_tokens is None:
            return min(default, room) if default is not None else room
        if isinstance(max_tokens, int) and max_tokens >= 1 and num_prompt + max_tokens > self.max_total_tokens:
            raise ApiError(400, f"this server's maximum context length is {self.max_total_tokens} tokens, but "
                           f"{num_prompt + max_tokens} were requested ({num_prompt} in the prompt, {max_tokens} in "
                           f"{param}); lower {param} to at most {room}", param=param, code="context_length_exceeded")
        return max_tokens

    def with_stop_ids(self, params: SamplingParams) -> SamplingParams:
        return self.llm._with_stop_ids(params)

    def prepare(self, tokens: list[int], params: SamplingParams, request_id: str,
                names: Mapping[str, str] | None = None) -> PreparedRequest:
        """Checks and tokens in the handler: a bad request never reaches the engine loop. `names`: the
        face's names of SamplingParams fields, for the errors (e.g. json_schema -> response_format)."""
        if not self.engine.is_running:
            raise ApiError(503, "the engine has stopped; restart the server", code="engine_dead")
        try:
            return self.engine.prepare(tokens, self.with_stop_ids(params), request_id)
        except ParameterError as exc:
            raise ApiError.from_parameter(exc.renamed(names or {})) from None
        except ValueError as exc:
            raise ApiError(400, str(exc), code="invalid_request") from None

    async def outputs(self, prepared: list[PreparedRequest], trace: Trace) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Run several prepared requests at once and yield (index, output) as outputs arrive. Closing
        this iterator early aborts the requests still running. A request the engine failed raises
        ApiError 500 after its output is seen."""
        trace.num_prompt_tokens = sum(p.num_prompt_tokens for p in prepared)
        merged: asyncio.Queue[tuple[int, RequestOutput] | BaseException] = asyncio.Queue()

        async def pump(index: int, request: PreparedRequest) -> None:
            try:
                async for out in self.engine.generate(request):
                    merged.put_nowait((index, out))
            except BaseException as exc:  # EngineDeadError, or cancellation
                merged.put_nowait(exc)
                raise

        try:
            tasks = [asyncio.ensure_future(pump(i, p)) for i, p in enumerate(prepared)]
        except EngineDeadError as exc:
            raise ApiError(503, str(exc), code="engine_dead") from None
        remaining = len(prepared)
        try:
            while remaining:
                item = await merged.get()
                if isinstance(item, BaseException):
                    if isinstance(item, EngineDeadError):
                        raise ApiError(503, str(item), code="engine_dead")
                    raise item
                index, out = item
                trace.saw(index, out)
                if out.finished:
                    remaining -= 1
                    if out.error is not None:
                        raise ApiError(500, f"generation failed: {out.error}", code="generation_failed")
                yield index, out
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()  # its generator's cleanup sends the abort
            await asyncio.gather(*tasks, return_exceptions=True)

    def finish(self, trace: Trace, status: int = 200) -> None:
        """The request's one log line and its metrics."""
        now = time.monotonic()
        reason = ",".join(sorted(set(trace.finish_reasons))) or ("disconnect" if status == 499 else "none")
        ttft = trace.first_token - trace.received if trace.first_token is not None else None
        logger.info(
            "%s %s status=%d in=%d out=%d queue=%s ttft=%s total=%.3fs finish=%s", trace.request_id, trace.route,
            status, trace.num_prompt_tokens, trace.num_output_tokens, _secs(trace.queue_time), _secs(ttft),
            now - trace.received, reason,
        )
        if self.metrics is not None:
            self.metrics.observe(trace, now, status)


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


async def until_disconnected(request: Request) -> None:
    """Return when the client goes away (its connection closes): the request body has been read, so
    the next ASGI message is the disconnect."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Any) -> Any:
    """Await `work` (a coroutine) unless the client disconnects first; then it is cancelled (which
    aborts its engine requests) and None is returned."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()

