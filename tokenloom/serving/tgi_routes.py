"""text-generation-inference routes (L6): /generate, /generate_stream, /info, /tokenize."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from tokenloom import __version__
from tokenloom.outputs import RequestOutput
from tokenloom.sampling_params import ParameterError, SamplingParams, build_sampling_params, check
from tokenloom.serving.context import ServingContext, Trace
from tokenloom.serving.errors import ApiError
from tokenloom.serving.protocol import TGIGenerateRequest, TGIParameters, TGITokenizeRequest
from tokenloom.serving.respond import respond
from tokenloom.serving.streaming import sse
from tokenloom.serving.structured import tgi_grammar_fields

router = APIRouter()

DEFAULT_MAX_NEW_TOKENS = 100  # TGI's default
_FINISH = {"eos": "eos_token", "stop": "stop_sequence", "length": "length", "time": "length", "abort": "length"}
# SamplingParams field -> TGI's parameter name, for errors
_NAMES = {"max_tokens": "max_new_tokens", "logprobs": "top_n_tokens"}
_GRAMMAR_NAMES = {"json_schema": "grammar", "regex": "grammar"}


def _finish_reason(out: RequestOutput | None) -> str:
    """TGI's name for why `out` ended. A completed grammar (a stop with no stop string) is TGI's
    eos_token: TGI ends a grammar by forcing the EOS token."""
    if out is None:
        return "length"
    if out.finish_reason == "stop" and out.stop_reason is None:
        return "eos_token"
    return _FINISH.get(out.finish_reason or "", "length")


def _ctx(request: Request) -> ServingContext:
    return request.app.state.serving()


def sampling(p: TGIParameters, max_new_tokens: int, want_logprobs: bool) -> SamplingParams:
    """TGI's parameters mapped onto sampling_params' table. As in TGI, decoding samples when do_sample
    is set or any warper is (temperature != 1, top_k, top_p < 1, typical_p < 1)."""
    unsupported = p.unsupported()
    if unsupported:
        raise ApiError(400, f"not supported by tokenloom yet: {', '.join(unsupported)}", param=unsupported[0].split("=")[0])
    temperature = 1.0 if p.temperature is None else p.temperature
    warpers = (temperature != 1.0 or (p.top_k or 0) != 0 or (p.top_p if p.top_p is not None else 1.0) < 1.0
               or (p.typical_p if p.typical_p is not None else 1.0) < 1.0)
    sample = p.do_sample or warpers
    values: dict[str, Any] = {
        "temperature": temperature if sample else 0.0,
        "top_k": (p.top_k or 0) if sample else 0,
        "top_p": (1.0 if p.top_p is None else p.top_p) if sample else 1.0,
        "typical_p": (1.0 if p.typical_p is None else p.typical_p) if sample else 1.0,
        "repetition_penalty": 1.0 if p.repetition_penalty is None else p.repetition_penalty,
        "frequency_penalty": 0.0 if p.frequency_penalty is None else p.frequency_penalty,
        "seed": p.seed,
        "max_tokens": max_new_tokens,
        "stop": list(p.stop),
        "logprobs": (p.top_n_tokens or 0) if want_logprobs else None,
        **tgi_grammar_fields(p.grammar),
    }
    try:
        for name, entry in (("temperature", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"),
                            ("typical_p", "typical_p"), ("top_n_tokens", "logprobs")):
            if getattr(p, name) is not None:  # checked even when greedy decoding leaves it unused
                check(entry, getattr(p, name), name)
        if sample and p.temperature is not None and p.temperature == 0:
            raise ParameterError("temperature", 0, "> 0 when sampling", "temperature must be strictly positive")
        return build_sampling_params(values, {**_NAMES, **_GRAMMAR_NAMES})
    except ParameterError as exc:
        raise ApiError.from_parameter(exc, 422) from None


def _prepare(ctx: ServingContext, req: TGIGenerateRequest, trace: Trace, want_logprobs: bool):
    if not req.inputs:
        raise ApiError(422, "inputs must not be empty", param="inputs")
    tokens = ctx.tokenizer.encode(req.inputs)
    p = req.parameters
    if p.truncate is not None:
        if p.truncate < 1:
            raise ApiError(422, f"truncate must be >= 1, got {p.truncate}", param="truncate")
        tokens = tokens[-p.truncate :]
    max_new = ctx.max_tokens_for(len(tokens), p.max_new_tokens, "max_new_tokens", default=DEFAULT_MAX_NEW_TOKENS)
    params = sampling(p, max_new, want_logprobs)
    return ctx.prepare(tokens, params, trace.request_id, _GRAMMAR_NAMES), params


def _token(ctx: ServingContext, out: RequestOutput, text: str | None = None) -> dict[str, Any]:
    token_id = out.new_token_ids[0] if out.new_token_ids else 0
    logprob = out.logprobs[0].logprob if out.logprobs else None
    return {"id": token_id, "text": ctx.tokenizer.decode([token_id]) if text is None else text,
            "logprob": logprob, "special": token_id in ctx._special_ids}


def _top_tokens(ctx: ServingContext, out: RequestOutput) -> list[dict[str, Any]]:
    if not out.logprobs:
        return []
    return [{"id": t, "text": ctx.tokenizer.decode([t]), "logprob": lp, "special": t in ctx._special_ids}
            for t, lp in out.logprobs[0].top]


def _stream_error(exc: ApiError) -> bytes:
    return sse({"error": exc.message, "error_type": "generation"})


def _events(ctx: ServingContext, req: TGIGenerateRequest, trace: Trace, params: SamplingParams):
    """TGI's stream: one event per token; the last one carries generated_text and details."""
    p = req.parameters

    async def stream_body(outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[bytes]:
        text, index = "", 0
        async for _, out in outputs:
            text += out.text_delta
            if not out.new_token_ids and not out.finished:
                continue
            event: dict[str, Any] = {"index": index, "token": _token(ctx, out, out.text_delta),
                                     "top_tokens": _top_tokens(ctx, out) if p.top_n_tokens else None,
                                     "generated_text": None, "details": None}
            index += 1
            if out.finished:
                event["generated_text"] = (req.inputs if p.return_full_text else "") + text
                event["details"] = {"finish_reason": _finish_reason(out),
                                    "generated_tokens": trace.num_output_tokens, "seed": params.seed,
                                    "input_length": trace.num_prompt_tokens}
            yield sse(event)

    return stream_body


@router.post("/generate")
async def generate(req: TGIGenerateRequest, request: Request) -> Response:
    ctx = _ctx(request)
    trace = Trace(ctx.new_id("tgi"), "generate")
    p = req.parameters
    prepared, params = _prepare(ctx, req, trace, want_logprobs=p.details)

    async def collect(outputs: AsyncIterator[tuple[int, RequestOutput]]) -> dict[str, Any]:
        text, tokens, top, last = "", [], [], None
        async for _, out in outputs:
            text += out.text_delta
            if out.new_token_ids:
                tokens.append(_token(ctx, out))
                top.append(_top_tokens(ctx, out))
            last = out
        body: dict[str, Any] = {"generated_text": (req.inputs if p.return_full_text else "") + text}
        if p.details:
            body["details"] = {
                "finish_reason": _finish_reason(last),
                "generated_tokens": trace.num_output_tokens, "seed": params.seed, "prefill": [], "tokens": tokens,
            }
            if p.top_n_tokens:
                body["details"]["top_tokens"] = top
        return body

    events = _events(ctx, req, trace, params)
    return await respond(request, ctx, trace, [prepared], req.stream, collect, events, _stream_error)


@router.post("/generate_stream")
async def generate_stream(req: TGIGenerateRequest, request: Request) -> Response:
    req.stream = True
    ctx = _ctx(request)
    trace = Trace(ctx.new_id("tgi"), "generate_stream")
    prepared, params = _prepare(ctx, req, trace, want_logprobs=True)

    async def collect(outputs: Any) -> None:  # never used: always streamed
        raise AssertionError("generate_stream always streams")

    return await respond(request, ctx, trace, [prepared], True, collect, _events(ctx, req, trace, params),
                         _stream_error)


@router.get("/info")
async def info(request: Request) -> dict[str, Any]:
    ctx = _ctx(request)
    engine = ctx.llm.engine
    return {
        "model_id": ctx.config.model_id or ctx.model_name, "model_sha": None,
        "model_dtype": str(engine.dtype).replace("torch.", ""), "model_device_type": engine.device.type,
        "model_pipeline_tag": "text-generation", "max_concurrent_requests": ctx.config.max_concurrent_requests,
        "max_best_of": 1, "max_stop_sequences": None, "max_input_tokens": ctx.max_input_tokens,
        "max_total_tokens": ctx.max_total_tokens, "validation_workers": 1, "max_client_batch_size": 1,
        "router": "tokenloom", "version": __version__, "sha": None, "docker_label": None,
    }


@router.post("/tokenize")
async def tokenize(req: TGITokenizeRequest, request: Request) -> list[dict[str, Any]]:
    ctx = _ctx(request)
    encoding = ctx.tokenizer.backend.encode(req.inputs, add_special_tokens=True)
    return [{"id": token_id, "text": req.inputs[start:stop], "start": start, "stop": stop}
            for token_id, (start, stop) in zip(encoding.ids, encoding.offsets)]
