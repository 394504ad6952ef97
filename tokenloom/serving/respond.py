"""One request from admission to its answer (L6), shared by the OpenAI and TGI routes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tokenloom.engine.engine import PreparedRequest
from tokenloom.serving.context import ServingContext, Trace, unless_disconnected
from tokenloom.serving.errors import ApiError
from tokenloom.serving.streaming import EventStream


async def respond(
    request: Request, ctx: ServingContext, trace: Trace, prepared: list[PreparedRequest], stream: bool,
    collect: Callable[[Any], Awaitable[Any]], stream_body: Callable[[Any], AsyncIterator[bytes]],
    stream_error: Callable[[ApiError], bytes],
) -> Response:
    """Admission, then the non-streaming answer (aborted if the client leaves) or the event stream."""
    status = 200
    try:
        slot = ctx.admission.slot()
        await slot.__aenter__()
    except ApiError as exc:
        ctx.finish(trace, exc.status)
        raise
    if stream:
        closed = False

        async def close() -> None:  # once, whether or not the body ever started
            nonlocal closed
            if not closed:
                closed = True
                await slot.__aexit__(None, None, None)
                ctx.finish(trace, status if trace.finish_reasons or status != 200 else 499)

        async def body() -> AsyncIterator[bytes]:
            nonlocal status
            outputs = ctx.outputs(prepared, trace)
            chunks = stream_body(outputs)
            try:
                async for chunk in chunks:
                    yield chunk
            except ApiError as exc:
                status = exc.status
                yield stream_error(exc)
            finally:  # a client that left: close the chain now, which aborts its requests
                await chunks.aclose()
                await outputs.aclose()
                await close()

        return EventStream(body(), on_close=close)
    outputs = ctx.outputs(prepared, trace)
    try:
        result = await unless_disconnected(request, collect(outputs))
        if result is None:
            status = 499  # the client went away; its requests were aborted
            return Response(status_code=499)
        return JSONResponse(result)
    except ApiError as exc:
        status = exc.status
        raise
    finally:
        await outputs.aclose()
        await slot.__aexit__(None, None, None)
        ctx.finish(trace, status)
