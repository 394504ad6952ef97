"""OpenAI routes (L6): /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from tokenloom.chat_template import ChatTemplateError
from tokenloom.outputs import RequestOutput, TokenLogprob
from tokenloom.sampling_params import (
    ParameterError,
    SamplingParams,
    build_sampling_params,
    check,
    logit_bias_to_sequence_bias,
)
from tokenloom.serving.context import ServingContext, Trace
from tokenloom.serving.errors import ApiError
from tokenloom.serving.protocol import ChatCompletionRequest, CompletionRequest, _OpenAISampling
from tokenloom.serving.respond import respond
from tokenloom.serving.streaming import sse
from tokenloom.serving.structured import (
    ToolPlan,
    structured_fields,
    structured_names,
    tool_calls_as_content,
    tools_system_text,
)

router = APIRouter()

# engine finish reasons as OpenAI reports them
_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "time": "length", "abort": "abort", "error": "error"}


def _ctx(request: Request) -> ServingContext:
    return request.app.state.serving()


# ---- parameters: OpenAI's names mapped onto sampling_params' table ---------------------------


def sampling(req: _OpenAISampling, max_tokens: int, max_tokens_name: str, logprobs: int | None,
             logprobs_name: str, tool_schema: dict[str, Any] | None = None) -> SamplingParams:
    """The request's SamplingParams; a bad value is a 400 naming the OpenAI parameter. `tool_schema`:
    the JSON schema tool_choice constrains the output to."""
    unsupported = req.unsupported()
    if unsupported:
        raise ApiError(400, f"not supported by tokenloom yet: {', '.join(unsupported)}", param=unsupported[0].split("=")[0],
                       code="unsupported_parameter")
    try:
        check("num_return_sequences", req.n, "n")
        top_k = req.top_k
        if top_k == -1:  # vLLM's "disabled"
            top_k = 0
        values: dict[str, Any] = {
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "top_k": 0 if top_k is None else top_k,
            "min_p": 0.0 if req.min_p is None else req.min_p,
            "repetition_penalty": 1.0 if req.repetition_penalty is None else req.repetition_penalty,
            "presence_penalty": 0.0 if req.presence_penalty is None else req.presence_penalty,
            "frequency_penalty": 0.0 if req.frequency_penalty is None else req.frequency_penalty,
            "seed": req.seed,
            "max_tokens": max_tokens,
            "min_tokens": 0 if req.min_tokens is None else req.min_tokens,
            "stop": [] if req.stop is None else req.stop,
            "stop_token_ids": list(req.stop_token_ids or []),
            "ignore_eos": req.ignore_eos,
            "include_stop_str_in_output": req.include_stop_str_in_output,
            "skip_special_tokens": req.skip_special_tokens,
            "sequence_bias": logit_bias_to_sequence_bias(req.logit_bias) if req.logit_bias else {},
            "logprobs": logprobs,
            **structured_fields(req, tool_schema),
        }
        params = build_sampling_params(values, {"max_tokens": max_tokens_name, "logprobs": logprobs_name,
                                                "sequence_bias": "logit_bias", **structured_names(req)})
    except ParameterError as exc:
        raise ApiError.from_parameter(exc) from None
    return params


def _choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n samples of one prompt: each its own seed (seed, seed + 1, ...) so they differ yet repeat."""
    if n == 1 or params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=(params.seed + j) % 2**63) for j in range(n)]


def _token_text(ctx: ServingContext, token_id: int) -> str:
    return ctx.tokenizer.decode([token_id])


def _chat_logprobs(ctx: ServingContext, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    def one(token_id: int, logprob: float) -> dict[str, Any]:
        text = _token_text(ctx, token_id)
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8"))}

    return [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]


def _completion_logprobs(ctx: ServingContext, entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    tokens, token_logprobs, top, offsets = [], [], [], []
    for e in entries:
        text = _token_text(ctx, e.token_id)
        offsets.append(offset)
        offset += len(text)
        tokens.append(text)
        token_logprobs.append(max(e.logprob, -9999.0))
        top.append({_token_text(ctx, t): max(lp, -9999.0) for t, lp in e.top})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _stream_error(exc: ApiError) -> bytes:
    body = {"error": {"message": exc.message, "type": "server_error", "param": None, "code": exc.code}}
    return sse(body) + b"data: [DONE]\n\n"


async def _gather(
    outputs: AsyncIterator[tuple[int, RequestOutput]], texts: list[str]
) -> tuple[list[str], list[str | None], list[list[Any]]]:
    """A non-streamed reply's choices, each started with its text in `texts`: the text, the finish
    reason (OpenAI's names) and the logprobs, from the (choice index, output) pairs."""
    reasons: list[str | None] = [None] * len(texts)
    lps: list[list[Any]] = [[] for _ in texts]
    async for index, out in outputs:
        texts[index] += out.text_delta
        if out.logprobs:
            lps[index].extend(out.logprobs)
        if out.finished:
            reasons[index] = _FINISH.get(out.finish_reason or "", out.finish_reason)
    return texts, reasons, lps


def _usage(trace: Trace) -> dict[str, Any]:
    return {"prompt_tokens": trace.num_prompt_tokens, "completion_tokens": trace.num_output_tokens,
            "total_tokens": trace.num_prompt_tokens + trace.num_output_tokens,
            "prompt_tokens_details": {"cached_tokens": trace.num_cached_tokens}}


# ---- chat ------------------------------------------------------------------------------------


def _render_chat(ctx: ServingContext, req: ChatCompletionRequest, tools: ToolPlan) -> list[int]:
    messages = []
    for i, message in enumerate(req.messages):
        data = message.model_dump(exclude_none=True)
        content = data.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported, got a "
                                   f"{part.get('type')!r} part", param=f"messages[{i}].content")
                texts.append(part["text"])
            data["content"] = "".join(texts)
        messages.append(data)
    tool_specs = [{"type": "function", "function": f} for f in tools.functions.values()] if tools.is_active else None
    try:
        source = ctx.tokenizer.get_chat_template(ctx.config.chat_template, tool_specs).source
        if tool_specs and "tools" not in source:
            # a template that does not render tools: they go into the system message
            messages = _with_tools_in_system(messages, tools_system_text(tools.functions))
            tool_specs = None
        if "tool_calls" not in source:
            messages = tool_calls_as_content(messages)
        text = ctx.tokenizer.apply_chat_template(
            messages, add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
            continue_final_message=req.continue_final_message, chat_template=ctx.config.chat_template,
            tools=tool_specs, **(req.chat_template_kwargs or {}),
        )
    except ChatTemplateError as exc:
        if ctx.config.chat_template is None and ctx.tokenizer.chat_template is None:
            raise ApiError(400, "this model has no chat template; start the server with --chat-template FILE "
                           "(a Jinja template), or use /v1/completions", param="messages",
                           code="no_chat_template") from None
        raise ApiError(400, f"the chat template failed on these messages: {exc}", param="messages") from None
    except (TypeError, ValueError) as exc:
        raise ApiError(400, f"the chat template failed on these messages: {exc}", param="messages") from None
    return ctx.tokenizer.encode(text, add_special_tokens=False)


def _with_tools_in_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
    ctx = _ctx(request)
    ctx.check_model(req.model)
    trace = Trace(ctx.new_id("chatcmpl"), "chat")
    tools = ToolPlan(req.tools, req.tool_choice, req.parallel_tool_calls)
    tokens = _render_chat(ctx, req, tools)
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = ctx.max_tokens_for(len(tokens), asked, name)
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling(req, max_tokens, name, logprobs, "top_logprobs", tools.schema)
    names = structured_names(req)
    prepared = [ctx.prepare(tokens, p, f"{trace.request_id}-{j}", names)
                for j, p in enumerate(_choice_params(params, req.n))]
    created = int(time.time())
    prefix = ""  # vLLM's echo: the reply starts with the final message when it is the assistant's own
    if req.echo and isinstance(req.messages[-1].content, str) and req.messages[-1].role == "assistant":
        prefix = req.messages[-1].content
    head = {"id": trace.request_id, "created": created, "model": ctx.model_name}
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def collect(outputs: AsyncIterator[tuple[int, RequestOutput]]) -> dict[str, Any]:
        texts, reasons, lps = await _gather(outputs, [prefix] * req.n)
        choices = []
        for j in range(req.n):
            message: dict[str, Any] = {"role": "assistant", "content": texts[j]}
            calls = tools.tool_calls(texts[j][len(prefix):])
            if calls is not None:
                message, reasons[j] = {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
            choices.append({
                "index": j, "message": message,
                "logprobs": {"content": _chat_logprobs(ctx, lps[j])} if req.logprobs else None,
                "finish_reason": reasons[j],
            })
        return {**head, "object": "chat.completion", "choices": choices, "usage": _usage(trace)}

    async def stream_body(outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[bytes]:
        chunk = {**head, "object": "chat.completion.chunk"}
        extra = {"usage": None} if include_usage else {}
        for j in range(req.n):
            yield sse({**chunk, "choices": [{"index": j, "delta": {"role": "assistant", "content": prefix},
                                             "logprobs": None, "finish_reason": None}], **extra})
        texts = [""] * req.n
        async for index, out in outputs:
            if tools.is_active:  # tool calls are parsed from the whole output: sent once it is complete
                texts[index] += out.text_delta
                if not out.finished:
                    continue
                calls = tools.tool_calls(texts[index])
                if calls is not None:
                    delta = {"tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]}
                    yield sse({**chunk, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                                     "finish_reason": "tool_calls"}], **extra})
                    continue
                out = dataclasses.replace(out, text_delta=texts[index])
            if out.text_delta or out.finished or (req.logprobs and out.logprobs):
                choice = {
                    "index": index, "delta": {"content": out.text_delta} if out.text_delta else {},
                    "logprobs": {"content": _chat_logprobs(ctx, out.logprobs or [])} if req.logprobs else None,
                    "finish_reason": _FINISH.get(out.finish_reason or "", out.finish_reason) if out.finished else None,
                }
                yield sse({**chunk, "choices": [choice], **extra})
        if include_usage:
            yield sse({**chunk, "choices": [], "usage": _usage(trace)})
        yield b"data: [DONE]\n\n"

    return await respond(request, ctx, trace, prepared, req.stream, collect, stream_body, _stream_error)


# ---- completions -----------------------------------------------------------------------------


def _prompts(ctx: ServingContext, prompt: Any) -> list[tuple[str, list[int]]]:
    """(text, token ids) per prompt: a string, a list of strings, token ids or lists of token ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    out = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            if not p:
                raise ApiError(400, f"prompt[{i}] must not be empty", param="prompt")
            out.append((p, ctx.tokenizer.encode(p)))
        else:
            if not p:
                raise ApiError(400, f"prompt[{i}] must contain at least one token id", param="prompt")
            vocab = ctx.llm.engine.model.config.vocab_size
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise ApiError(400, f"prompt[{i}] token ids must be in [0, {vocab}), got {bad[:5]}", param="prompt")
            out.append((ctx.tokenizer.decode(p), list(p)))
    return out


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request) -> Response:
    ctx = _ctx(request)
    ctx.check_model(req.model)
    trace = Trace(ctx.new_id("cmpl"), "completion")
    if req.echo and req.logprobs is not None:
        raise ApiError(400, "echo together with logprobs (prompt logprobs) is not supported by tokenloom yet",
                       param="echo", code="unsupported_parameter")
    prompts = _prompts(ctx, req.prompt)
    prepared = []
    for i, (_, tokens) in enumerate(prompts):
        max_tokens = ctx.max_tokens_for(len(tokens), req.max_tokens, "max_tokens")
        params = sampling(req, max_tokens, "max_tokens", req.logprobs, "logprobs")
        for j, p in enumerate(_choice_params(params, req.n)):
            prepared.append(ctx.prepare(tokens, p, f"{trace.request_id}-{i * req.n + j}", structured_names(req)))
    count = len(prepared)
    prefixes = [prompts[k // req.n][0] if req.echo else "" for k in range(count)]
    head = {"id": trace.request_id, "created": int(time.time()), "model": ctx.model_name}
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def collect(outputs: AsyncIterator[tuple[int, RequestOutput]]) -> dict[str, Any]:
        texts, reasons, lps = await _gather(outputs, list(prefixes))
        choices = [{
            "index": k, "text": texts[k], "finish_reason": reasons[k],
            "logprobs": _completion_logprobs(ctx, lps[k], len(prefixes[k])) if req.logprobs is not None else None,
        } for k in range(count)]
        return {**head, "object": "text_completion", "choices": choices, "usage": _usage(trace)}

    async def stream_body(outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[bytes]:
        chunk = {**head, "object": "text_completion"}
        extra = {"usage": None} if include_usage else {}
        offsets = [len(p) for p in prefixes]
        for k, p in enumerate(prefixes):
            if p:
                yield sse({**chunk, "choices": [{"index": k, "text": p, "logprobs": None, "finish_reason": None}], **extra})
        async for index, out in outputs:
            if out.text_delta or out.finished or (req.logprobs is not None and out.logprobs):
                lp = None
                if req.logprobs is not None:
                    lp = _completion_logprobs(ctx, out.logprobs or [], offsets[index])
                offsets[index] += len(out.text_delta)
                choice = {"index": index, "text": out.text_delta, "logprobs": lp,
                          "finish_reason": _FINISH.get(out.finish_reason or "", out.finish_reason) if out.finished else None}
                yield sse({**chunk, "choices": [choice], **extra})
        if include_usage:
            yield sse({**chunk, "choices": [], "usage": _usage(trace)})
        yield b"data: [DONE]\n\n"

    return await respond(request, ctx, trace, prepared, req.stream, collect, stream_body, _stream_error)


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    ctx = _ctx(request)
    return {"object": "list", "data": [{
        "id": ctx.model_name, "object": "model", "created": ctx.created, "owned_by": "tokenloom",
        "root": ctx.config.model_id or ctx.model_name, "max_model_len": ctx.max_total_tokens,
    }]}

