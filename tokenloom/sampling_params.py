"""Per-request generation parameters (L0: no torch). Validated once, here, at the edge."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How one request is decoded.

    temperature == 0 (or do_sample False at the compat layer) means greedy decoding.
    top_k == 0 disables top-k; top_p == 1.0 disables nucleus filtering.
    seed: a per-request seed; the same seed gives the same sample whatever else shares the batch.
    stop_token_ids: generation ends after any of these ids (EOS ids go here).
    max_tokens: most new tokens; min_tokens: stop ids are masked until this many were generated.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # logits processors (transformers semantics and order; presence/frequency as OpenAI)
    min_p: float = 0.0
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: list[list[int]] = field(default_factory=list)
    sequence_bias: dict[tuple[int, ...], float] = field(default_factory=dict)  # logit_bias: 1-token keys
    suppress_tokens: list[int] = field(default_factory=list)
    begin_suppress_tokens: list[int] = field(default_factory=list)  # only at the first generated token
    renormalize_logits: bool = False
    # stopping
    stop: list[str] = field(default_factory=list)  # stop strings
    include_stop_str_in_output: bool = False  # text faces cut the output before the stop string
    max_time: float | None = None  # seconds from when the request was added
    # outputs
    logprobs: int | None = None  # None: no logprobs; k: the chosen token's and k alternatives
    output_scores: bool = False  # keep each step's processed scores row
    output_logits: bool = False  # keep each step's raw logits row

    def __post_init__(self) -> None:
        _check_number("temperature", self.temperature, "a finite number >= 0", lambda v: v >= 0)
        _check_int("top_k", self.top_k, ">= 0 (0 disables it)", lambda v: v >= 0)
        _check_number("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        _check_int("max_tokens", self.max_tokens, ">= 1", lambda v: v >= 1)
        _check_int("min_tokens", self.min_tokens, ">= 0", lambda v: v >= 0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        if self.seed is not None:
            _check_int("seed", self.seed, "an integer >= 0", lambda v: v >= 0)
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id, "integers >= 0", lambda v: v >= 0)
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def _check_number(name: str, value: object, allowed: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_int(name: str, value: object, allowed: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
