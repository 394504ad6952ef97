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


@dataclass
class RequestOutput:
    """One request's progress after a step.

    new_token_ids/text_delta: what this step added; token_ids/text: everything generated so far.
    finish_reason: None while running, else "eos", "stop", "length", "time" or "abort".
    stop_reason: what ended it: the stop string matched (finish_reason "stop") or the stop token id
        generated (finish_reason "eos"); None otherwise.
    logprobs: one TokenLogprob per new token when SamplingParams.logprobs is set, else None.
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
