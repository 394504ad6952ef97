"""The offline API (L5): a model, its tokenizer and one engine; text in, text out."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from tokenloom.config import EngineConfig
from tokenloom.engine.engine import Engine
from tokenloom.loading import LoadedModel, load_model
from tokenloom.outputs import RequestOutput
from tokenloom.sampling_params import SamplingParams
from tokenloom.tokenizer import Tokenizer


@dataclass
class Completion:
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None


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

    # ---- parameters -----------------------------------------------------------------------
    @property
    def stop_token_ids(self) -> list[int]:
        """EOS ids from generation_config.json plus the tokenizer's EOS token."""
        eos = self.generation_defaults.get("eos_token_id")
        ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return [int(i) for i in dict.fromkeys(ids)]

    def sampling_params(self, **overrides: Any) -> SamplingParams:
        """The model's defaults (generation_config.json: do_sample, temperature, top_k, top_p), then
        `overrides`. Without do_sample in the config, decoding is greedy unless a temperature > 0 is given."""
        cfg = self.generation_defaults
        values: dict[str, Any] = {"temperature": 0.0, "stop_token_ids": self.stop_token_ids}
        if cfg.get("do_sample"):
            values.update(
                temperature=float(cfg.get("temperature", 1.0)),
                top_k=int(cfg.get("top_k", 50) or 0),
                top_p=float(cfg.get("top_p", 1.0)),
            )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingParams(**values)

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
        ids = self.engine.add_requests([(tokens, p) for (_, tokens), p in zip(encoded, plist)])
        results = {out.request_id: out for out in self.engine.stream(ids) if out.finished}
        return [
            Completion(text, tokens, results[rid].text, results[rid].token_ids, results[rid].finish_reason)
            for rid, (text, tokens) in zip(ids, encoded)
        ]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield an output per generated token; text deltas are UTF-8 safe. Streams of several
        prompts may be interleaved: each receives only its own outputs."""
        _, tokens = self._encode(prompt)
        request_id = self.engine.add_request(tokens, self._with_stop_ids(params or self.sampling_params()))
        yield from self.engine.stream([request_id])

    def _with_stop_ids(self, params: SamplingParams) -> SamplingParams:
        """The model's EOS ids are stop ids for every request unless it sets ignore_eos."""
        if params.ignore_eos or set(self.stop_token_ids) <= set(params.stop_token_ids):
            return params
        return dataclasses.replace(params, stop_token_ids=[*params.stop_token_ids, *self.stop_token_ids])

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """Render the chat template (with the generation prompt) and tokenize it without adding
        special tokens again, so a BOS written by the template is not doubled."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)


def _is_id_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, int) for v in value)


def _per_prompt(params: SamplingParams | Sequence[SamplingParams], count: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} SamplingParams for {count} prompts")
    return params
