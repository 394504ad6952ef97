"""What the engine checks and builds per request (L5): the prepared request handed between threads,
the vocabulary and stop-string checks, the final metrics, and the prefix cache's namespace."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tokenloom.engine.sequence import Sequence
from tokenloom.outputs import RequestMetrics, RequestOutput
from tokenloom.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from tokenloom.detokenizer import IncrementalDetokenizer
    from tokenloom.models.base import CausalLM
    from tokenloom.tokenizer import Tokenizer


class RequestFailedError(RuntimeError):
    """A step failed while computing this request (the model or the sampler raised); the request was
    finished with finish_reason "error" and its blocks were freed. The cause is chained."""


@dataclass
class PreparedRequest:
    """A request checked and ready to queue: what `Engine.prepare_request` (any thread) hands to
    `Engine.enqueue` (the thread that steps the engine). Nothing in the engine refers to it yet."""

    request_id: str
    seq: Sequence
    seed: int | None  # None: greedy (no generator)
    detokenizer: IncrementalDetokenizer | None

    @property
    def num_prompt_tokens(self) -> int:
        return self.seq.num_prompt_tokens


def checked_ids(vocab_size: int, what: str, ids: list[int]) -> list[int]:
    """`ids` as ints, or a ValueError naming `what` when one lies outside the vocabulary."""
    values = [int(t) for t in ids]
    bad = [t for t in values if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{what} must be in [0, {vocab_size}) for this model, got {bad[:5]}")
    return values


def check_param_ids(vocab_size: int, params: SamplingParams) -> None:
    """Every token id a request's parameters name must exist in the model's vocabulary."""
    checked_ids(vocab_size, "stop_token_ids", params.stop_token_ids)
    checked_ids(vocab_size, "suppress_tokens", params.suppress_tokens)
    checked_ids(vocab_size, "begin_suppress_tokens", params.begin_suppress_tokens)
    checked_ids(vocab_size, "bad_words_ids", [t for word in params.bad_words_ids for t in word])
    checked_ids(vocab_size, "sequence_bias", [t for key in params.sequence_bias for t in key])


def checked_stop(tokenizer: Tokenizer | None, params: SamplingParams) -> list[str]:
    """The request's stop strings (their form is checked by SamplingParams): they are matched on
    the detokenized text, so they need the engine's tokenizer."""
    stop = params.stop
    if stop and tokenizer is None:
        raise ValueError(
            f"stop strings {stop[:5]!r} need a tokenizer to match the generated text, and this engine "
            "has none; create it with Engine(model, config, tokenizer=...) or use stop_token_ids"
        )
    return stop


def cache_namespace(model: CausalLM, dtype: torch.dtype, device: torch.device) -> str:
    """What the prefix cache's keys start from: everything besides the tokens that decides what a KV
    block holds (the pool belongs to one model, so this guards against mixing modes in one pool)."""
    formats = sorted({type(m).__name__ for m in model.modules() if not list(m.children())})
    return f"{type(model).__module__}.{type(model).__qualname__}|{dtype}|{device.type}|{','.join(formats)}"


def raise_if_failed(out: RequestOutput) -> None:
    if out.error is not None:
        raise RequestFailedError(f"request {out.request_id!r} failed: {out.error}") from out.exception


def request_metrics(seq: Sequence) -> RequestMetrics:
    return RequestMetrics(
        arrival_time=seq.arrival_time,
        first_scheduled_time=seq.first_scheduled_time,
        first_token_time=seq.first_token_time,
        finished_time=time.monotonic(),
        num_prompt_tokens=seq.num_prompt_tokens,
        num_generated_tokens=seq.num_output_tokens,
        num_cached_tokens=seq.num_cached_tokens,
    )


def row_extra(values: list, row: int) -> list | None:
    """A runner row's extra (logprobs, scores or logits) as the one-entry list for its new token;
    None when the row did not ask for it (or the runner does not produce it)."""
    value = values[row] if row < len(values) else None
    return None if value is None else [value]
