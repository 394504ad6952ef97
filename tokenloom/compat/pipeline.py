"""`pipeline("text-generation", ...)` as in transformers (L6), on the compat model's engine.

Inputs: a string, a list of strings, a chat (a list of {"role", "content"} dicts, rendered with the chat
template and its generation prompt) or a list of chats. Outputs are transformers' exactly: per input a
list of {"generated_text": ...} dicts (one per returned sequence), nested in a list for list inputs;
for a chat with return_full_text the conversation with the new assistant message appended.

Generation defaults are transformers' pipeline defaults (max_new_tokens=256, do_sample=True,
temperature=0.7) for whatever neither the call nor the model's generation_config sets. All inputs go
to the engine together (continuous batching), `batch_size` at a time when given; each row is
generated unpadded, so the text equals transformers' for batch_size=1.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tokenloom.compat.model import AutoModelForCausalLM, TokenloomForCausalLM, _explicit_settings
from tokenloom.compat.tokenizer import AutoTokenizer, TokenloomTokenizer
from tokenloom.generation_settings import warn_if_default_length

# transformers' TextGenerationPipeline._default_generation_config
PIPELINE_DEFAULTS: dict[str, Any] = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}
# Only applied when sampling (transformers' _SAMPLING_PARAMS)
_SAMPLING_ONLY = frozenset({"temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff"})
# Call arguments that shape inputs or outputs rather than generation
_PIPELINE_ARGS = frozenset({
    "return_full_text", "return_text", "return_tensors", "clean_up_tokenization_spaces", "prefix",
    "handle_long_generation", "stop_sequence", "truncation", "continue_final_message", "skip_special_tokens",
    "tokenizer_encode_kwargs", "tools", "documents", "add_special_tokens", "padding", "batch_size", "num_workers",
})

Chat = Sequence[Mapping[str, Any]]


def pipeline(
    task: str = "text-generation",
    model: str | os.PathLike[str] | TokenloomForCausalLM | None = None,
    tokenizer: str | os.PathLike[str] | Any = None,
    *,
    device: Any = None,
    device_map: Any = None,
    dtype: Any = None,
    model_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> TextGenerationPipeline:
    """transformers' `pipeline(...)` for the "text-generation" task.

    `model` is a name or path (loaded with AutoModelForCausalLM.from_pretrained) or a loaded model;
    `tokenizer` None means the model's own. Other keyword arguments (max_new_tokens, return_full_text,
    batch_size, ...) become defaults for every call, as in transformers."""
    if task != "text-generation":
        raise ValueError(f"task must be 'text-generation' (the only pipeline tokenloom provides), got {task!r}")
    if model is None:
        raise ValueError("pipeline() needs model= (a name, a path or a loaded TokenloomForCausalLM)")
    kwargs.pop("trust_remote_code", None)
    if not isinstance(model, TokenloomForCausalLM):
        load_kwargs = dict(model_kwargs or {})
        if device_map is not None or device is not None:
            load_kwargs["device_map"] = device_map if device_map is not None else _device_map(device)
        if dtype is not None:
            load_kwargs["dtype"] = dtype
        model = AutoModelForCausalLM.from_pretrained(model, **load_kwargs)
    elif device is not None or device_map is not None:
        model.to(device_map if device_map is not None else _device_map(device))
    if tokenizer is None:
        if model.engine.tokenizer is None:
            raise ValueError(f"the model {model.name_or_path!r} has no tokenizer: pass tokenizer=...")
        tokenizer = TokenloomTokenizer(model.engine.tokenizer, name_or_path=model.name_or_path)
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return TextGenerationPipeline(model, tokenizer, **kwargs)


def _device_map(device: Any) -> Any:
    if isinstance(device, int):
        return "cpu" if device < 0 else f"cuda:{device}"
    return device


class TextGenerationPipeline:
    """Complete prompts or chats; what `pipeline("text-generation", ...)` returns."""

    task = "text-generation"

    def __init__(self, model: TokenloomForCausalLM, tokenizer: Any, **kwargs: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self._call_defaults = kwargs
        self._check_args(kwargs)

    @staticmethod
    def _check_args(kwargs: Mapping[str, Any]) -> None:
        if kwargs.get("handle_long_generation") is not None:
            raise ValueError("handle_long_generation is not supported by tokenloom (leave it at None)")
        if kwargs.get("return_text") is not None and kwargs.get("return_full_text") is not None:
            raise ValueError("`return_text` is mutually exclusive with `return_full_text`")
        batch_size = kwargs.get("batch_size")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")

    def __call__(self, text_inputs: str | Chat | Sequence[str] | Sequence[Chat], **kwargs: Any) -> list[Any]:
        """Generate for one input or a list; returns transformers' nested list of dicts."""
        options = {**self._call_defaults, **kwargs}
        self._check_args(options)
        generate_kwargs = {k: v for k, v in options.items() if k not in _PIPELINE_ARGS}
        if options.get("stop_sequence") is not None:
            stop = options["stop_sequence"]
            generate_kwargs["stop_strings"] = [stop] if isinstance(stop, str) else list(stop)
        is_batch, items = _split_inputs(text_inputs)
        prompts = [self._encode(item, options) for item in items]
        per_input = self._generate(prompts, generate_kwargs, options.get("batch_size"))
        records = [self._records(item, prompt, results, options)
                   for item, prompt, results in zip(items, prompts, per_input)]
        return records if is_batch else records[0]

    # ---- steps ------------------------------------------------------------------------------------
    def _encode(self, item: str | Chat, options: Mapping[str, Any]) -> list[int]:
        encode_kwargs = dict(options.get("tokenizer_encode_kwargs") or {})
        if isinstance(item, str):
            if options.get("add_special_tokens") is not None:
                encode_kwargs["add_special_tokens"] = options["add_special_tokens"]
            if options.get("truncation") is not None:
                encode_kwargs["truncation"] = options["truncation"]
            return list(self.tokenizer((options.get("prefix") or "") + item, **encode_kwargs)["input_ids"])
        text = self.tokenizer.apply_chat_template(
            list(item),
            add_generation_prompt=not _continues(item, options),
            continue_final_message=_continues(item, options),
            tokenize=False,
            tools=options.get("tools"),
            documents=options.get("documents"),
            **encode_kwargs,
        )
        # the rendered template holds its special tokens already (transformers tokenizes it the same way)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _generate(
        self, prompts: list[list[int]], generate_kwargs: dict[str, Any], batch_size: int | None
    ) -> list[list[Any]]:
        """Per prompt, its num_return_sequences RowResults."""
        generation_config = generate_kwargs.pop("generation_config", None)
        streamer = generate_kwargs.pop("streamer", None)
        # transformers' _prepare_generate_kwargs: the pipeline's defaults fill what nobody set
        passed = _explicit_settings(generation_config) if generation_config is not None else {}
        given = {**self.model.generation_config.explicitly_set(), **passed,
                 **{k: v for k, v in generate_kwargs.items() if v is not None}}
        added = {k: v for k, v in PIPELINE_DEFAULTS.items() if k not in given}
        if "max_length" in given:
            added.pop("max_new_tokens", None)
        if not {**given, **added}.get("do_sample"):
            added = {k: v for k, v in added.items() if k not in _SAMPLING_ONLY}
        if "pad_token_id" not in given and getattr(self.tokenizer, "pad_token_id", None) is not None:
            added["pad_token_id"] = self.tokenizer.pad_token_id
        config = self.model._call_config(generation_config, {**generate_kwargs, **added})
        default_length = "max_new_tokens" in added
        if streamer is not None and len(prompts) > 1:
            raise ValueError("a streamer streams one input at a time: call the pipeline with one input")
        if config.stop_strings:
            self.model._use_tokenizer(self.tokenizer)
        chunk = batch_size or max(len(prompts), 1)
        per_input: list[list[Any]] = []
        for start in range(0, len(prompts), chunk):
            batch = prompts[start : start + chunk]
            # max_length is a total: the plan depends on the prompt's length, so rows are grouped by it
            totals = "max_length" in given or "min_length" in given
            by_length: dict[int, list[int]] = {}
            for i, prompt in enumerate(batch):
                by_length.setdefault(len(prompt) if totals else 0, []).append(i)
            results: dict[int, list[Any]] = {}
            for indices in by_length.values():
                plan = config.plan(len(batch[indices[0]]))
                rows = [batch[i] for i in indices]
                prompt_ids = torch.tensor(rows) if streamer is not None and len(rows) == 1 else None
                out = self.model.generate_rows(rows, plan, streamer=streamer, prompt_ids=prompt_ids)
                if default_length:
                    warn_if_default_length(
                        dataclasses.replace(plan, uses_default_length=True),
                        [(len(r.token_ids), r.finish_reason) for r in out],
                        limit=PIPELINE_DEFAULTS["max_new_tokens"],
                        stacklevel=3,
                    )
                n = plan.num_return_sequences
                for k, i in enumerate(indices):
                    results[i] = out[k * n : (k + 1) * n]
            per_input.extend(results[i] for i in range(len(batch)))
        return per_input

    def _records(
        self, item: str | Chat, prompt: list[int], results: list[Any], options: Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        if options.get("return_tensors"):
            return [{"generated_token_ids": prompt + r.token_ids} for r in results]
        full = options.get("return_full_text")
        full = True if full is None else bool(full)
        skip = options.get("skip_special_tokens")
        decode_kwargs: dict[str, Any] = {"skip_special_tokens": True if skip is None else skip}
        if options.get("clean_up_tokenization_spaces") is not None:
            decode_kwargs["clean_up_tokenization_spaces"] = options["clean_up_tokenization_spaces"]
        records = []
        for result in results:
            text = self.tokenizer.decode(result.token_ids, **decode_kwargs)
            if not full:
                records.append({"generated_text": text})
            elif isinstance(item, str):
                records.append({"generated_text": item + text})
            elif _continues(item, options):
                last = dict(item[-1])
                records.append({"generated_text": [*item[:-1], {"role": last["role"], "content": last["content"] + text}]})
            else:
                records.append({"generated_text": [*item, {"role": "assistant", "content": text}]})
        return records


def _continues(chat: Chat, options: Mapping[str, Any]) -> bool:
    """transformers' default: a chat that ends with an assistant message is continued (a prefill)."""
    value = options.get("continue_final_message")
    return chat[-1].get("role") == "assistant" if value is None else bool(value)


def _is_chat(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple)) and bool(value)
        and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value)
    )


def _split_inputs(text_inputs: Any) -> tuple[bool, list[str | Chat]]:
    """(is a list of inputs, the inputs)."""
    if isinstance(text_inputs, str) or _is_chat(text_inputs):
        return False, [text_inputs]
    if isinstance(text_inputs, (list, tuple)) and text_inputs and all(
        isinstance(t, str) or _is_chat(t) for t in text_inputs
    ):
        return True, list(text_inputs)
    raise ValueError(
        "text-generation inputs must be a string, a list of strings, a chat (a list of {'role', 'content'} "
        f"dicts) or a list of chats, got {type(text_inputs).__name__}"
    )


__all__ = ["TextGenerationPipeline", "pipeline"]
