"""Per-request generation parameters (L0: no torch). Validated once, here, at the edge.

This module is the one table of parameter ranges (`RANGES`). Every face (transformers names,
OpenAI, TGI, CLI flags) maps its own names onto these fields and re-raises a `ParameterError`
under its own name (`ParameterError.renamed`), so a range is written down exactly once.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tokenloom.speculative_config import SpeculativeConfig

# A seed must fit a signed 64-bit integer: torch.Generator.manual_seed overflows above it.
MAX_SEED = 2**63
MAX_LOGPROBS = 20


class ParameterError(ValueError):
    """A parameter outside its allowed range: carries the parameter's name, its value and the allowed
    range, and re-renders itself under another face's name (`renamed`)."""

    def __init__(self, param: str, value: object, allowed: str, message: str | None = None) -> None:
        self.param = param
        self.value = value
        self.allowed = allowed
        self._message = message
        super().__init__(message if message is not None else f"{param} must be {allowed}, got {value!r}")

    def renamed(self, names: Mapping[str, str] | str) -> ParameterError:
        """The same error named the way a face names its parameters: `names` maps field names to the
        face's (e.g. {"max_tokens": "max_new_tokens"}), or is the new name of `param` itself. Fields
        the mapping lacks keep their names."""
        if isinstance(names, str):
            names = {self.param: names}
        param = names.get(self.param, self.param)
        message = self._message
        if message is not None and names:
            # messages that relate two fields (min_tokens vs max_tokens) name both the face's way
            pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in sorted(names, key=len, reverse=True)) + r")\b")
            message = pattern.sub(lambda m: names[m.group(1)], message)
        return ParameterError(param, self.value, self.allowed, message)


@dataclass(frozen=True)
class Range:
    """What one parameter accepts: `allowed` as shown to the user, `ok` the test (types included)."""

    allowed: str
    ok: Callable[[Any], bool]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_token_id(value: object) -> bool:
    return _is_int(value) and value >= 0  # type: ignore[operator]


def _integer(ok: Callable[[int], bool]) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and ok(v)


def _number(ok: Callable[[float], bool]) -> Callable[[Any], bool]:
    return lambda v: _is_number(v) and ok(v)


def _boolean(v: Any) -> bool:
    return isinstance(v, bool)


def _token_list(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(is_token_id(t) for t in v)


def _bad_words_ok(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(
        isinstance(word, (list, tuple)) and word and all(is_token_id(t) for t in word) for word in v
    )


def _stop_ok(v: Any) -> bool:
    stops = [v] if isinstance(v, str) else v  # one string is a list of one, as in vLLM
    return isinstance(stops, (list, tuple)) and all(isinstance(s, str) and s for s in stops)


_BOOL = Range("True or False", _boolean)

# The one table. Floats accept ints, never bools; `None` is "not set" for the fields in _OPTIONAL.
RANGES: dict[str, Range] = {
    "temperature": Range("a finite number >= 0", _number(lambda v: v >= 0)),
    "top_k": Range(">= 0 (0 disables it)", _integer(lambda v: v >= 0)),
    "top_p": Range("in (0, 1]", _number(lambda v: 0 < v <= 1)),
    "min_p": Range("in [0, 1]", _number(lambda v: 0 <= v <= 1)),
    "typical_p": Range("in (0, 1] (1 disables it)", _number(lambda v: 0 < v <= 1)),
    "epsilon_cutoff": Range("in [0, 1) (0 disables it)", _number(lambda v: 0 <= v < 1)),
    "eta_cutoff": Range("in [0, 1) (0 disables it)", _number(lambda v: 0 <= v < 1)),
    "repetition_penalty": Range("a finite number > 0 (1 disables it)", _number(lambda v: v > 0)),
    "presence_penalty": Range("in [-2, 2]", _number(lambda v: -2 <= v <= 2)),
    "frequency_penalty": Range("in [-2, 2]", _number(lambda v: -2 <= v <= 2)),
    "no_repeat_ngram_size": Range(">= 0 (0 disables it)", _integer(lambda v: v >= 0)),
    "max_tokens": Range(">= 1", _integer(lambda v: v >= 1)),
    "min_tokens": Range(">= 0", _integer(lambda v: v >= 0)),
    "seed": Range("an integer in [0, 2**63)", _integer(lambda v: 0 <= v < MAX_SEED)),
    "max_time": Range("a finite number of seconds > 0", _number(lambda v: v > 0)),
    "logprobs": Range(f"in [0, {MAX_LOGPROBS}]", _integer(lambda v: 0 <= v <= MAX_LOGPROBS)),
    "stop_token_ids": Range("a list of token ids >= 0", _token_list),
    "suppress_tokens": Range("a list of token ids >= 0", _token_list),
    "begin_suppress_tokens": Range("a list of token ids >= 0", _token_list),
    "bad_words_ids": Range("a list of non-empty lists of token ids >= 0", _bad_words_ok),
    "stop": Range("a list of non-empty strings", _stop_ok),
    "ignore_eos": _BOOL,
    "renormalize_logits": _BOOL,
    "include_stop_str_in_output": _BOOL,
    "skip_special_tokens": _BOOL,
    "output_scores": _BOOL,
    "output_logits": _BOOL,
    # one token's entry in sequence_bias / logit_bias
    "token_bias": Range("a finite number", _number(lambda v: True)),
    "logit_bias": Range("a number in [-100, 100] per token", _number(lambda v: -100 <= v <= 100)),
    # decoding above the per-request parameters: beam search and several samples per prompt
    "num_beams": Range(">= 1", _integer(lambda v: v >= 1)),
    "num_return_sequences": Range(">= 1", _integer(lambda v: v >= 1)),
    "length_penalty": Range("a finite number", _number(lambda v: True)),
    "do_sample": _BOOL,
    "flag": _BOOL,  # any other True/False switch of a face
}
_OPTIONAL = frozenset({"seed", "max_time", "logprobs"})  # None means "not set"


def check(name: str, value: Any, as_name: str | None = None) -> Any:
    """`value` if it is in the range `RANGES[name]`, else a ParameterError naming `as_name` (the face's
    name for the parameter; default `name`), the value and the allowed range."""
    if not RANGES[name].ok(value):
        raise ParameterError(as_name or name, value, RANGES[name].allowed)
    return value


def check_number(name: str, value: object, allowed: str, ok: Callable[[Any], bool]) -> None:
    """Raise ParameterError naming `name`, `value` and `allowed` unless value is a finite number (not a
    bool) for which `ok` holds: for a bound that depends on another parameter (the table holds the rest)."""
    if not _is_number(value) or not ok(value):
        raise ParameterError(name, value, allowed)


def check_int(name: str, value: object, allowed: str, ok: Callable[[Any], bool]) -> None:
    """As `check_number`, for integers."""
    if not _is_int(value) or not ok(value):
        raise ParameterError(name, value, allowed)


def build_sampling_params(values: Mapping[str, Any], names: Mapping[str, str] | None = None) -> SamplingParams:
    """`SamplingParams(**values)` for a face whose parameters are named `names` (field -> face name):
    a bad value raises a ParameterError that names the face's parameter."""
    try:
        return SamplingParams(**values)
    except ParameterError as exc:
        raise exc.renamed(names or {}) from None


def logit_bias_to_sequence_bias(logit_bias: Mapping[Any, Any], name: str = "logit_bias") -> dict[tuple[int, ...], float]:
    """OpenAI's logit_bias ({token_id: bias}, ids may be JSON strings) as sequence_bias keys of one token."""
    if not isinstance(logit_bias, Mapping):
        raise ParameterError(name, logit_bias, "a dict {token_id: bias}")
    out: dict[tuple[int, ...], float] = {}
    for token, bias in logit_bias.items():
        token_id = int(token) if isinstance(token, str) and token.isdigit() else token
        if not is_token_id(token_id):
            raise ParameterError(name, token, "keyed by token ids (integers >= 0)")
        check("logit_bias", bias, name)
        key = (int(token_id),)  # type: ignore[arg-type]
        out[key] = out.get(key, 0.0) + float(bias)
    return out


@dataclass
class SamplingParams:
    """How one request is decoded.

    temperature == 0 (or do_sample False at the compat layer) means greedy decoding.
    top_k == 0 disables top-k; top_p == 1.0 disables nucleus filtering.
    seed: a per-request seed in [0, 2**63); the same seed gives the same sample whatever else shares the batch.
    stop_token_ids: generation ends after any of these ids (EOS ids go here).
    max_tokens: most new tokens; min_tokens: stop ids are masked until this many were generated.
    The logits processors follow transformers (same meaning, same order, neutral values switch them
    off); repetition_penalty and no_repeat_ngram_size look at prompt + generated tokens, presence and
    frequency penalties (OpenAI/vLLM) at the generated ones. The warpers (temperature, top_k, top_p,
    min_p, typical_p, epsilon_cutoff, eta_cutoff) apply only when sampling.
    json_schema / regex / choice / grammar (at most one): the output is constrained to it by a token
    mask (tokenloom.sampling.grammar); the request ends when the grammar is complete.
    Invalid values raise ParameterError (a ValueError) naming the parameter, the value and the allowed
    range (`RANGES`).
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
    # speculative decoding for this request (None: the engine's EngineConfig.speculative)
    speculative: SpeculativeConfig | None = None
    # structured output: at most one; the output is constrained to it (tokenloom.sampling.grammar)
    json_schema: dict[str, Any] | str | None = None  # a JSON schema (a dict or its JSON text)
    regex: str | None = None  # the whole output matches this regular expression
    choice: list[str] | None = None  # the output is exactly one of these strings
    grammar: str | None = None  # a Lark grammar (llguidance's dialect) or a GBNF one (rules with ::=)

    def __post_init__(self) -> None:
        for name in _FIELDS_IN_TABLE:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            check(name, value)
        if self.min_tokens > self.max_tokens:
            raise ParameterError(
                "min_tokens", self.min_tokens, "<= max_tokens",
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
            )
        for name in ("stop_token_ids", "suppress_tokens", "begin_suppress_tokens"):
            setattr(self, name, list(getattr(self, name)))
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids))
        self.bad_words_ids = [list(word) for word in self.bad_words_ids]
        self.sequence_bias = _sequence_bias(self.sequence_bias)
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if self.speculative is not None and not isinstance(self.speculative, SpeculativeConfig):
            raise ParameterError("speculative", self.speculative, "a SpeculativeConfig or None")
        self._check_structured()

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def structured(self) -> tuple[str, Any] | None:
        """(field name, value) of the structured-output constraint, or None."""
        for name in STRUCTURED_FIELDS:
            value = getattr(self, name)
            if value is not None:
                return name, value
        return None

    def _check_structured(self) -> None:
        given = [name for name in STRUCTURED_FIELDS if getattr(self, name) is not None]
        if len(given) > 1:
            raise ParameterError(given[1], getattr(self, given[1]), f"unset when {given[0]} is set",
                                 f"only one of {', '.join(STRUCTURED_FIELDS)} may be set, got {' and '.join(given)}")
        if isinstance(self.json_schema, str):
            try:
                self.json_schema = json.loads(self.json_schema)
            except ValueError as exc:
                raise ParameterError("json_schema", self.json_schema, "a JSON schema",
                                     f"json_schema is not valid JSON: {exc}") from None
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise ParameterError("json_schema", self.json_schema, "a JSON schema (an object, as a dict or JSON text)")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise ParameterError(name, value, "a non-empty string")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice or not all(
                isinstance(c, str) and c for c in self.choice
            ):
                raise ParameterError("choice", self.choice, "a non-empty list of non-empty strings")
            self.choice = list(self.choice)


STRUCTURED_FIELDS = ("json_schema", "regex", "choice", "grammar")
_FIELDS_IN_TABLE = tuple(name for name in SamplingParams.__dataclass_fields__ if name in RANGES)


def _sequence_bias(value: object) -> dict[tuple[int, ...], float]:
    allowed = "a dict from non-empty tuples of token ids >= 0 to finite floats"
    if not isinstance(value, dict):
        raise ParameterError("sequence_bias", value, allowed)
    for key, bias in value.items():
        if not isinstance(key, tuple) or not key or not all(is_token_id(t) for t in key):
            raise ParameterError("sequence_bias", key, allowed, f"sequence_bias must be {allowed}, got the key {key!r}")
        if not RANGES["token_bias"].ok(bias):
            raise ParameterError("sequence_bias", bias, allowed, f"sequence_bias must be {allowed}, got {bias!r} for {key!r}")
    return {key: float(bias) for key, bias in value.items()}
