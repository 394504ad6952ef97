"""Speculative decoding settings (L0: no torch). Used engine-wide (`EngineConfig.speculative`) or per
request (`SamplingParams.speculative`); the request's setting wins.

The names follow vLLM's `speculative_config` (method, num_speculative_tokens, prompt_lookup_min /
prompt_lookup_max) and map from transformers' `prompt_lookup_num_tokens` / `max_matching_ngram_size`
and `assistant_model`.
"""

from __future__ import annotations

from dataclasses import dataclass

# "ngram" is vLLM's name for prompt lookup, "draft" for a draft model: both are accepted.
METHODS = {"prompt_lookup": "prompt_lookup", "ngram": "prompt_lookup", "draft_model": "draft_model", "draft": "draft_model"}
MAX_SPECULATIVE_TOKENS = 64


@dataclass(frozen=True)
class SpeculativeConfig:
    """method: "prompt_lookup" (n-gram match in the prompt and output so far; vLLM's "ngram",
    transformers' prompt_lookup_num_tokens) or "draft_model" (a smaller model with the same vocabulary
    proposes; transformers' assistant_model, vLLM's speculative model; the engine needs that model).
    num_speculative_tokens: most tokens proposed per step (0 turns speculation off for a request).
    prompt_lookup_max / prompt_lookup_min: the longest / shortest n-gram (suffix of the sequence) that is
    searched for earlier in the sequence; the tokens after its first earlier occurrence are proposed.

    Greedy requests produce exactly the tokens of plain greedy decoding; sampled ones are verified by
    rejection sampling, so their output follows the target model's distribution."""

    method: str = "prompt_lookup"
    num_speculative_tokens: int = 5
    prompt_lookup_max: int = 3
    prompt_lookup_min: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"speculative method must be one of {sorted(METHODS)}, got {self.method!r}"
            )
        object.__setattr__(self, "method", METHODS[self.method])
        _check_int("num_speculative_tokens", self.num_speculative_tokens, 0, MAX_SPECULATIVE_TOKENS)
        _check_int("prompt_lookup_min", self.prompt_lookup_min, 1, None)
        _check_int("prompt_lookup_max", self.prompt_lookup_max, 1, None)
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"prompt_lookup_min ({self.prompt_lookup_min}) must not exceed prompt_lookup_max "
                f"({self.prompt_lookup_max})"
            )

    @property
    def is_enabled(self) -> bool:
        return self.num_speculative_tokens > 0

    @property
    def uses_draft_model(self) -> bool:
        return self.method == "draft_model"


def _check_int(name: str, value: object, low: int, high: int | None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def effective_speculative(
    request: SpeculativeConfig | None, engine: SpeculativeConfig | None
) -> SpeculativeConfig | None:
    """The setting a request runs with: its own, else the engine's; None when speculation is off."""
    chosen = request if request is not None else engine
    return chosen if chosen is not None and chosen.is_enabled else None
