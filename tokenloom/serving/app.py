"""The FastAPI app (L6): routes, limits, API key, errors in each API's shape, health, metrics, the page."""

from __future__ import annotations

import contextlib
import hmac
import logging
import threading
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenloom.serving.config import ServerConfig
from tokenloom.serving.context import ServingContext
from tokenloom.serving.errors import ApiError, is_tgi_path, validation_message
from tokenloom.serving.metrics import Metrics

if TYPE_CHECKING:
    from tokenloom.llm import LLM

logger = logging.getLogger("tokenloom.serving")

# Routes open without the API key: the page (it asks for the key itself), health and metrics probes.
_OPEN_PATHS = frozenset({"/", "/health", "/metrics", "/favicon.ico"})


def create_app(config: ServerConfig, llm: LLM | None = None, load: Callable[[], LLM] | None = None) -> FastAPI:
    """The server app for `llm`, or for the model `load()` returns: it is called in a background
    thread at startup, and /health answers 503 until it has returned."""
    if (llm is None) == (load is None):
        raise ValueError("create_app needs exactly one of llm= or load=")
    metrics = Metrics()
    holder: dict[str, Any] = {"context": None, "error": None}

    def attach(model: LLM) -> None:
        context = ServingContext(model, config, metrics)
        metrics.bind(context.engine, context.admission)
        holder["context"] = context

    def loader() -> None:
        try:
            attach(load())  # type: ignore[misc]
            logger.info("model loaded; serving %s", config.served_model_name)
        except BaseException as exc:  # reported by /health and every route
            holder["error"] = exc
            logger.error("loading the model failed: %s: %s", type(exc).__name__, exc)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if llm is not None:
            attach(llm)
        else:
            threading.Thread(target=loader, name="tokenloom-load", daemon=True).start()
        yield
        context = holder["context"]
        if context is not None and load is not None:
            context.engine.shutdown()  # a model this app loaded: its engine loop ends with the app

    app = FastAPI(title="tokenloom", lifespan=lifespan, docs_url="/docs", redoc_url=None)

    def serving() -> ServingContext:
        context = holder["context"]
        if context is None:
            if holder["error"] is not None:
                raise ApiError(503, f"the model failed to load: {holder['error']}", code="model_load_failed")
            raise ApiError(503, "the model is still loading; retry when /health answers 200",
                           code="model_loading", headers={"Retry-After": "2"})
        return context

    app.state.serving = serving
    app.state.holder = holder
    app.state.metrics = metrics

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        if exc.status >= 400 and exc.status not in (429, 503):
            logger.info("refused %s %s: %d %s", request.method, request.url.path, exc.status, exc.message)
        return exc.for_path(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, field = validation_message(list(exc.errors()))
        status = 422 if is_tgi_path(request.url.path) else 400
        return ApiError(status, message, param=field, code="invalid_request").for_path(request.url.path)

    @app.get("/health")
    async def health() -> Response:
        context = holder["context"]
        if context is None:
            state = "failed" if holder["error"] is not None else "loading"
            return JSONResponse({"status": state}, status_code=503)
        if not context.engine.is_healthy:
            return JSONResponse({"status": "unhealthy", "error": str(context.engine.error or "steps keep failing")},
                                status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(_page_html(), headers={"Cache-Control": "no-cache"})

    from tokenloom.serving import openai_routes, tgi_routes

    app.include_router(openai_routes.router)
    app.include_router(tgi_routes.router)
    app.add_middleware(Guard, config=config)  # type: ignore[arg-type]
    return app


def _page_html() -> str:
    return resources.files("tokenloom.serving").joinpath("static/chat.html").read_text(encoding="utf-8")


class Guard:
    """Pure ASGI middleware (it must not wrap `receive` in a way that hides disconnects): 413 for a
    body over the limit, whether announced by Content-Length or streamed; 401 without the API key."""

    def __init__(self, app: ASGIApp, config: ServerConfig) -> None:
        self.app = app
        self.limit = config.max_body_bytes
        self.key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self.key is not None and path not in _OPEN_PATHS and scope.get("method") != "OPTIONS":
            given = headers.get("authorization", b"")
            token = given[7:].strip() if given[:7].lower() == b"bearer " else headers.get("x-api-key", b"")
            if not hmac.compare_digest(token, self.key):  # constant time
                message = "missing API key" if not token else "invalid API key"
                await _send(ApiError(401, f"{message}: send `Authorization: Bearer <key>` (the server's --api-key)",
                                     code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}), path, scope, receive, send)
                return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _send(self._too_large(int(length)), path, scope, receive, send)
            return
        received = 0
        limit = self.limit
        too_large = self._too_large

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(too_large(received))
            return message

        try:
            await self.app(scope, counted, send)
        except _BodyTooLarge as exc:
            await _send(exc.error, path, scope, receive, send)

    def _too_large(self, size: int) -> ApiError:
        return ApiError(413, f"the request body has {size} bytes; this server takes at most {self.limit}",
                        code="request_too_large")


class _BodyTooLarge(Exception):
    def __init__(self, error: ApiError) -> None:
        self.error = error


async def _send(error: ApiError, path: str, scope: Scope, receive: Receive, send: Send) -> None:
    await error.for_path(path)(scope, receive, send)
