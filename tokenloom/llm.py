"""The offline API (L5): a model, its tokenizer and one engine; text in, text out."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from tokenloom.config import EngineConfig
from tokenloom.engine.async_engine import AsyncEngine
from tokenloom.engine.engine import Engine, RequestFailedError
from tokenloom.engine.memory import MemoryUsage
from tokenloom.generation_settings import DEFAULTS, UNSUPPORTED, eos_token_ids, resolve, to_sampling_params
from tokenloom.loading import LoadedModel, load_model
from tokenloom.outputs import RequestOutput, TokenLogprob
from tokenloom.sampling_params import SamplingParams
from tokenloom.tokenizer import Tokenizer, end_of_turn_stops

_ASYNC_START_LOCK = threading.Lock()

# SamplingParams fields that are applied as given, after the transformers-named mapping
_PARAM_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


@dataclass
class Completion:
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[TokenLogprob] | None = None  # one per generated token when SamplingParams.logprobs is set


class LLM:
    """Load once, generate many: `LLM("smollm2-135m-instruct").generate(["Hello"])`."""

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        gguf_file: str | None = None,
        device_map: Any = "auto",
        dtype: Any = None,
        quantize_bits: int | None = None,
        engine_config: EngineConfig | None = None,
        progress: bool = False,
    ) -> None:
        self.loaded: LoadedModel = load_model(
            model, gguf_file, device_map=device_map, dtype=dtype, quantize_bits=quantize_bits, progress=progress
        )
        self.tokenizer = Tokenizer.from_source(self.loaded.checkpoint.source)
        self.engine = Engine(self.loaded.model, engine_config, tokenizer=self.tokenizer)
        self.generation_defaults = dict(self.loaded.checkpoint.generation_config)
        self._stop_token_ids = self._model_stop_ids()
        self._async_engine: AsyncEngine | None = None

    def memory_usage(self) -> MemoryUsage:
        """Bytes of the weights and the KV pool, and the process's peak memory so far."""
        return self.engine.memory_usage()

    # ---- parameters -----------------------------------------------------------------------
    def _model_stop_ids(self) -> list[int]:
        ids = eos_token_ids(self.generation_defaults.get("eos_token_id"))
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        ids = list(dict.fromkeys(ids))
        return [*ids, *end_of_turn_stops(self.tokenizer, ids, stacklevel=3)]

    @property
    def stop_token_ids(self) -> list[int]:
        """EOS ids from generation_config.json, the tokenizer's EOS token and, when those omit it, the
        chat template's end-of-turn token (with a warning at load time)."""
        return list(self._stop_token_ids)

    def sampling_params(self, **overrides: Any) -> SamplingParams:
        """The model's generation_config.json (do_sample, temperature, top_k, top_p, repetition_penalty,
        ... as transformers names them), mapped by `tokenloom.generation_settings`, then `overrides`.

        Overrides named like SamplingParams fields (temperature, max_tokens, stop, ...) are applied as
        given; other transformers names (max_new_tokens, do_sample, stop_strings, ...) go through the
        mapping. Without do_sample in the config, decoding is greedy unless a temperature > 0 is given.
        None values are ignored. max_length/min_length (totals) are not used: prompts come later."""
        given = {k: v for k, v in overrides.items() if v is not None}
        settings = {
            k: v for k, v in self.generation_defaults.items()
            if (k in DEFAULTS or k in UNSUPPORTED) and k not in ("max_length", "min_length")
        }
        settings.update({k: v for k, v in given.items() if k not in _PARAM_FIELDS})
        settings["eos_token_id"] = self.stop_token_ids
        params = to_sampling_params(settings)
        direct = {k: v for k, v in given.items() if k in _PARAM_FIELDS}
        resolve({k: v for k, v in direct.items() if k in DEFAULTS})  # the edge check, transformers' names
        return dataclasses.replace(params, **direct) if direct else params

    # ---- generation -----------------------------------------------------------------------
    def _encode(self, prompt: str | Sequence[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return prompt, self.tokenizer.encode(prompt)
        return None, [int(t) for t in prompt]

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Generate for every prompt (strings or token-id lists) in one continuous batch."""
        batch = [prompts] if isinstance(prompts, str) or _is_id_list(prompts) else list(prompts)
        plist = [self._with_stop_ids(p) for p in _per_prompt(params or self.sampling_params(), len(batch))]
        encoded = [self._encode(p) for p in batch]
        if self._async_engine is not None:  # the loop owns the engine now: go through it
            prepared = [self.engine.prepare_request(tokens, p) for (_, tokens), p in zip(encoded, plist)]
            ids = [r.request_id for r in prepared]
            outputs: Iterator[RequestOutput] = _raising(self._async_engine.stream(prepared))
        else:
            ids = self.engine.add_requests([(tokens, p) for (_, tokens), p in zip(encoded, plist)])
            outputs = self.engine.stream(ids)
        results: dict[str, RequestOutput] = {}
        logprobs: dict[str, list[TokenLogprob]] = {}
        for out in outputs:
            if out.logprobs is not None:
                logprobs.setdefault(out.request_id, []).extend(out.logprobs)
            if out.finished:
                results[out.request_id] = out
        return [
            Completion(
                text, tokens, results[rid].text, results[rid].token_ids, results[rid].finish_reason,
                results[rid].stop_reason, logprobs.get(rid),
            )
            for rid, (text, tokens) in zip(ids, encoded)
        ]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield an output per generated token; text deltas are UTF-8 safe. Streams of several
        prompts may be interleaved: each receives only its own outputs."""
        _, tokens = self._encode(prompt)
        params = self._with_stop_ids(params or self.sampling_params())
        if self._async_engine is not None:
            yield from _raising(self._async_engine.stream([self.engine.prepare_request(tokens, params)]))
            return
        request_id = self.engine.add_request(tokens, params)
        yield from self.engine.stream([request_id])

    async def stream_async(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None
    ) -> AsyncIterator[RequestOutput]:
        """`stream` as an async generator, a client of the engine loop (`async_engine`): the model
        runs in the loop's thread, so the event loop stays free. Any number of stream_async calls may
        run concurrently; they are batched together. Closing the generator early, or cancelling the
        task that iterates it, aborts the request before the engine's next step."""
        _, tokens = self._encode(prompt)
        prepared = self.engine.prepare_request(tokens, self._with_stop_ids(params or self.sampling_params()))
        async for out in self.async_engine.generate(prepared):
            if out.error is not None:
                raise RequestFailedError(f"request {out.request_id!r} failed: {out.error}") from out.exception
            yield out

    @property
    def async_engine(self) -> AsyncEngine:
        """The loop that owns this LLM's engine, started on first use; from then on `generate` and
        `stream` go through it too (one thread steps the engine)."""
        with _ASYNC_START_LOCK:
            if self._async_engine is None:
                self._async_engine = AsyncEngine(self.engine)
        return self._async_engine

    def close(self) -> None:
        """Stop the engine loop, if one was started (aborting what it still runs)."""
        if self._async_engine is not None:
            self._async_engine.shutdown()
            self._async_engine = None

    def reset_prefix_cache(self) -> None:
        """Forget every prefix the automatic prefix cache holds (vLLM's `LLM.reset_prefix_cache`): the
        next requests compute their prompts cold. Once the async engine's loop owns the engine, the
        reset runs in its thread between two steps."""
        if self._async_engine is not None:
            self._async_engine.call(lambda engine: engine.block_manager.reset_prefix_cache())
        else:
            self.engine.block_manager.reset_prefix_cache()

    def _with_stop_ids(self, params: SamplingParams) -> SamplingParams:
        """The model's EOS ids are stop ids for every request unless it sets ignore_eos."""
        if params.ignore_eos or set(self.stop_token_ids) <= set(params.stop_token_ids):
            return params
        return dataclasses.replace(params, stop_token_ids=[*params.stop_token_ids, *self.stop_token_ids])

    def chat_prompt(self, messages: list[dict[str, Any]], chat_template: str | None = None) -> list[int]:
        """Render the chat template (with the generation prompt) and tokenize it without adding
        special tokens again, so a BOS written by the template is not doubled. `chat_template` (Jinja
        text) replaces the model's own, e.g. for a base model that ships none."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, chat_template=chat_template)
        return self.tokenizer.encode(text, add_special_tokens=False)


def _raising(outputs: Iterator[RequestOutput]) -> Iterator[RequestOutput]:
    for out in outputs:
        if out.error is not None:
            raise RequestFailedError(f"request {out.request_id!r} failed: {out.error}") from out.exception
        yield out


def _is_id_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, int) for v in value)


def _per_prompt(params: SamplingParams | Sequence[SamplingParams], count: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} SamplingParams for {count} prompts")
    return params
