"""Per-request generation parameters (L0: no torch). Validated once, here, at the edge."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SamplingParams:
    """How one request is decoded.

    temperature == 0 (or do_sample False at the compat layer) means greedy decoding.
    top_k == 0 disables top-k; top_p == 1.0 disables nucleus filtering.
    seed: a per-request seed; the same seed gives the same sample whatever else shares the batch.
    stop_token_ids: generation ends after any of these ids (EOS ids go here).
    max_tokens: most new tokens; min_tokens: stop ids are masked until this many were generated.
    The logits processors follow transformers (same meaning, same order, neutral values switch them
    off); repetition_penalty and no_repeat_ngram_size look at prompt + generated tokens, presence and
    frequency penalties (OpenAI/vLLM) at the generated ones. The warpers (temperature, top_k, top_p,
    min_p, typical_p, epsilon_cutoff, eta_cutoff) apply only when sampling.
    Invalid values raise ValueError naming the parameter, the value and the allowed range.
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
    skip_special_tokens: bool = True  # in the output text, and so in the text stop strings match
    max_time: float | None = None  # seconds from when the request was added
    # outputs
    logprobs: int | None = None  # None: no logprobs; k: the chosen token's and k alternatives
    output_scores: bool = False  # keep each step's processed scores row
    output_logits: bool = False  # keep each step's raw logits row

    def __post_init__(self) -> None:
        for name, kind, allowed, ok in _CHECKS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            (check_int if kind is int else check_number)(name, value, allowed, ok)
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        for name in ("stop_token_ids", "suppress_tokens", "begin_suppress_tokens"):
            setattr(self, name, _token_ids(name, getattr(self, name), "a list of token ids >= 0"))
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids))
        self.bad_words_ids = _bad_words(self.bad_words_ids)
        self.sequence_bias = _sequence_bias(self.sequence_bias)
        self.stop = _stop_strings(self.stop)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


# (field, int or float, allowed range as shown to the user, test). Floats accept ints; never bools.
_CHECKS: tuple[tuple[str, type, str, Callable[[Any], bool]], ...] = (
    ("temperature", float, "a finite number >= 0", lambda v: v >= 0),
    ("top_k", int, ">= 0 (0 disables it)", lambda v: v >= 0),
    ("top_p", float, "in (0, 1]", lambda v: 0 < v <= 1),
    ("min_p", float, "in [0, 1]", lambda v: 0 <= v <= 1),
    ("typical_p", float, "in (0, 1]", lambda v: 0 < v <= 1),
    ("epsilon_cutoff", float, "in [0, 1)", lambda v: 0 <= v < 1),
    ("eta_cutoff", float, "in [0, 1)", lambda v: 0 <= v < 1),
    ("repetition_penalty", float, "a finite number > 0 (1 disables it)", lambda v: v > 0),
    ("presence_penalty", float, "in [-2, 2]", lambda v: -2 <= v <= 2),
    ("frequency_penalty", float, "in [-2, 2]", lambda v: -2 <= v <= 2),
    ("no_repeat_ngram_size", int, ">= 0 (0 disables it)", lambda v: v >= 0),
    ("max_tokens", int, ">= 1", lambda v: v >= 1),
    ("min_tokens", int, ">= 0", lambda v: v >= 0),
    ("seed", int, "an integer >= 0", lambda v: v >= 0),
    ("max_time", float, "a finite number of seconds > 0", lambda v: v > 0),
    ("logprobs", int, "in [0, 20]", lambda v: 0 <= v <= 20),
)
_OPTIONAL = frozenset({"seed", "max_time", "logprobs"})  # None means "not set"
_BOOLS = (
    "ignore_eos", "renormalize_logits", "include_stop_str_in_output", "skip_special_tokens", "output_scores",
    "output_logits",
)


def check_number(name: str, value: object, allowed: str, ok: Callable[[Any], bool]) -> None:
    """Raise ValueError naming `name`, `value` and `allowed` unless value is a finite number (not a
    bool) for which `ok` holds. Shared by every parameter check at the edge."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_int(name: str, value: object, allowed: str, ok: Callable[[Any], bool]) -> None:
    """As `check_number`, for integers."""
    if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _token_ids(name: str, value: object, allowed: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(is_token_id(t) for t in value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return list(value)


def _bad_words(value: object) -> list[list[int]]:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(word, (list, tuple)) and word and all(is_token_id(t) for t in word) for word in value
    ):
        raise ValueError(f"bad_words_ids must be a list of non-empty lists of token ids >= 0, got {value!r}")
    return [list(word) for word in value]


def _sequence_bias(value: object) -> dict[tuple[int, ...], float]:
    allowed = "a dict from non-empty tuples of token ids >= 0 to finite floats"
    if not isinstance(value, dict):
        raise ValueError(f"sequence_bias must be {allowed}, got {value!r}")
    for key, bias in value.items():
        if not isinstance(key, tuple) or not key or not all(is_token_id(t) for t in key):
            raise ValueError(f"sequence_bias must be {allowed}, got the key {key!r}")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
            raise ValueError(f"sequence_bias must be {allowed}, got {bias!r} for {key!r}")
    return {key: float(bias) for key, bias in value.items()}


def _stop_strings(value: object) -> list[str]:
    stops = [value] if isinstance(value, str) else value  # one string is a list of one, as in vLLM
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop must be a list of non-empty strings, got {value!r}")
    return list(stops)
