"""What generation yields to every face (L0: no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TokenLogprob:
    """The log-probability of one generated token and the most likely alternatives at its position.

    logprob: log-softmax of the model's raw logits (before any processor) at the chosen token.
    top: up to `SamplingParams.logprobs` (token_id, logprob) pairs, most likely first.
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class TokenIdsSlice:
    """`ids[start:end]`, copied only when read. The engine hands one out as `RequestOutput.token_ids`
    so a step does not copy every request's whole output; it relies on `ids` only ever growing."""

    ids: list[int]
    start: int
    end: int

    def materialize(self) -> list[int]:
        return self.ids[self.start : self.end]


@dataclass
class RequestMetrics:
    """When a request passed each stage (time.monotonic() seconds), on its final output: arrival
    (prepared), first scheduled (its queue time ends), first token, finished."""

    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float
    num_prompt_tokens: int
    num_generated_tokens: int
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time


@dataclass
class RequestOutput:
    """One request's progress after a step.

    new_token_ids/text_delta: what this step added; token_ids/text: everything generated so far
        (token_ids may be given as a TokenIdsSlice: it is copied into a list on first read).
    text: a tail that could still begin a stop string is held back until it no longer can, so the
        deltas so far always join to `text`, and never to a piece of a stop string that gets cut.
    finish_reason: None while running, else "eos", "stop", "length", "time", "abort" or "error".
    stop_reason: what ended it: the stop string matched (finish_reason "stop") or the stop token id
        generated (finish_reason "eos"); None otherwise.
    logprobs: one TokenLogprob per new token when SamplingParams.logprobs is set, else None.
    error / exception: with finish_reason "error", what the step that failed this request raised.
    metrics: timings of the request, on its final output.
    scores / logits: per new token, the processed scores / raw logits row ([vocab] tensors) when
        SamplingParams.output_scores / output_logits is set, else None.
    """

    request_id: str
    prompt_token_ids: list[int]
    new_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    text_delta: str = ""
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    scores: list[Any] | None = None
    logits: list[Any] | None = None
    error: str | None = None
    exception: BaseException | None = field(default=None, repr=False, compare=False)
    metrics: RequestMetrics | None = field(default=None, compare=False)


def _get_token_ids(self: RequestOutput) -> list[int]:
    value = self.__dict__["_token_ids"]
    if isinstance(value, TokenIdsSlice):
        value = self.__dict__["_token_ids"] = value.materialize()
    return value


def _set_token_ids(self: RequestOutput, value: list[int] | TokenIdsSlice) -> None:
    self.__dict__["_token_ids"] = value


# The dataclass __init__ assigns token_ids through this property, which accepts a TokenIdsSlice and
# turns it into a list the first time it is read: readers always see a plain list[int].
RequestOutput.token_ids = property(_get_token_ids, _set_token_ids)  # type: ignore[assignment]
