"""Generation settings named as in transformers -> the engine's per-request SamplingParams (L0: no torch).

The one mapping every face uses: `GenerationConfig` (compat), `LLM.sampling_params`, the pipeline.
Settings are validated here, at the edge, with messages that name the *transformers* parameter, its
value and the allowed range. A setting that is absent or None takes transformers' default.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenloom.sampling_params import (
    ParameterError,
    SamplingParams,
    build_sampling_params,
    check,
    check_int,
    is_token_id,
    logit_bias_to_sequence_bias,
)
from tokenloom.speculative_config import SpeculativeConfig

# transformers' default when neither the caller nor max_length says how long to generate (>= 5: new tokens)
DEFAULT_MAX_NEW_TOKENS = 20

# Every knob tokenloom implements, with transformers' default (None: off / not set).
DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "max_new_tokens": None,
    "min_length": 0,
    "min_new_tokens": None,
    "do_sample": False,
    "num_beams": 1,
    "num_return_sequences": 1,
    "length_penalty": 1.0,
    "early_stopping": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "renormalize_logits": False,
    "stop_strings": None,
    "max_time": None,
    "pad_token_id": None,
    "bos_token_id": None,
    "eos_token_id": None,
    "use_cache": True,
    "output_scores": False,
    "output_logits": False,
    "return_dict_in_generate": False,
    # tokenloom extras (OpenAI-style), mapped straight to SamplingParams
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "logit_bias": None,
    "seed": None,
    # speculative decoding by prompt lookup (transformers' names; see tokenloom.speculative_config)
    "prompt_lookup_num_tokens": None,
    "max_matching_ngram_size": None,
    # structured output (tokenloom.sampling.grammar): at most one, not with beam search
    "json_schema": None,
    "regex": None,
    "choice": None,
    "grammar": None,
}

# transformers knobs tokenloom does not implement, with their neutral value: anything else is an error
# naming the knob rather than a silent no-op.
UNSUPPORTED: dict[str, Any] = {
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "constraints": None,
    "force_words_ids": None,
    "penalty_alpha": None,
    "dola_layers": None,
    "guidance_scale": None,
    "watermarking_config": None,
    "exponential_decay_length_penalty": None,
    "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0,
    "top_h": None,
    "token_healing": False,
    "assistant_early_exit": None,
    "remove_invalid_values": False,
    "output_attentions": False,
    "output_hidden_states": False,
}

# Keys found in generation_config.json files that do not change what is generated here.
IGNORED = frozenset({
    "transformers_version", "_from_model_config", "cache_implementation", "cache_config", "max_cache_len",
    "forced_eos_token_id", "forced_bos_token_id", "decoder_start_token_id", "compile_config", "disable_compile",
    "prefill_chunk_size", "is_assistant", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind",
    "continuous_batching_config", "low_memory", "use_mtp", "speculation_type", "assistant_ensemble_weight",
})

# generate() arguments of transformers that tokenloom does not take (they need Python hooks in the loop
# or a second model).
UNSUPPORTED_GENERATE_ARGS = frozenset({
    "assistant_tokenizer", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn",
    "negative_prompt_ids", "negative_prompt_attention_mask", "synced_gpus", "custom_generate",
})


@dataclass(frozen=True)
class DecodingPlan:
    """What one generate() call does: per-request parameters plus the choices made above the engine.

    uses_default_length: no max_new_tokens / max_length was set, so the 20-token default applies.
    """

    sampling: SamplingParams
    num_beams: int
    num_return_sequences: int
    length_penalty: float
    early_stopping: bool | str
    return_dict_in_generate: bool
    uses_default_length: bool

    @property
    def is_beam_search(self) -> bool:
        return self.num_beams > 1


def resolve(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Every known setting, None/absent ones replaced by transformers' default; validated.

    Raises ValueError naming an unknown setting, an unsupported knob or an out-of-range value."""
    unknown = sorted(k for k in settings if k not in DEFAULTS and k not in UNSUPPORTED and k not in IGNORED)
    if unknown:
        raise ValueError(f"unknown generation parameter(s): {', '.join(unknown)}")
    refused = [
        f"{key}={settings[key]!r} (leave it at {neutral!r})"
        for key, neutral in UNSUPPORTED.items()
        if settings.get(key) is not None and settings[key] != neutral
    ]
    if refused:
        raise ValueError(f"not supported by tokenloom: {', '.join(refused)}")
    values = {k: (settings[k] if settings.get(k) is not None else default) for k, default in DEFAULTS.items()}
    _validate(values)
    return values


def plan_generation(settings: Mapping[str, Any], prompt_length: int | None = None) -> DecodingPlan:
    """Map transformers-named settings to a DecodingPlan.

    `prompt_length` is the (padded) input width that transformers measures max_length and min_length
    against; without it (the offline API, which builds parameters before seeing prompts) those two are
    not used. A max_length counts only when it is in `settings` (set by someone): as in transformers
    >= 5, the default one means 20 *new* tokens."""
    values = resolve(settings)
    explicit_max_length = settings.get("max_length") is not None and prompt_length is not None
    if values["max_new_tokens"] is not None:
        max_new = values["max_new_tokens"]
    elif explicit_max_length:
        max_new = values["max_length"] - prompt_length
        if max_new < 1:
            raise ValueError(
                f"the input is {prompt_length} tokens long, which reaches max_length={values['max_length']}; "
                "set max_new_tokens to say how many tokens to generate"
            )
    else:
        max_new = DEFAULT_MAX_NEW_TOKENS
    if values["min_new_tokens"] is not None:
        min_new = values["min_new_tokens"]
    elif prompt_length is not None:
        min_new = max(0, values["min_length"] - prompt_length)  # min_length counts the prompt too
    else:
        min_new = 0
    sampling = bool(values["do_sample"])
    stops = values["stop_strings"]
    speculative = _prompt_lookup(values)
    params = build_sampling_params(dict(
        temperature=float(values["temperature"]) if sampling else 0.0,
        top_k=int(values["top_k"]) if sampling else 0,
        top_p=float(values["top_p"]) if sampling else 1.0,
        min_p=float(values["min_p"] or 0.0) if sampling else 0.0,
        typical_p=float(values["typical_p"]) if sampling else 1.0,
        epsilon_cutoff=float(values["epsilon_cutoff"]) if sampling else 0.0,
        eta_cutoff=float(values["eta_cutoff"]) if sampling else 0.0,
        seed=values["seed"],
        max_tokens=max_new,
        min_tokens=min(min_new, max_new),
        stop_token_ids=eos_token_ids(values["eos_token_id"]),
        repetition_penalty=float(values["repetition_penalty"]),
        presence_penalty=float(values["presence_penalty"]),
        frequency_penalty=float(values["frequency_penalty"]),
        no_repeat_ngram_size=int(values["no_repeat_ngram_size"]),
        bad_words_ids=[[int(t) for t in seq] for seq in values["bad_words_ids"] or []],
        sequence_bias=_sequence_bias(values["sequence_bias"], values["logit_bias"]),
        suppress_tokens=[int(t) for t in values["suppress_tokens"] or []],
        begin_suppress_tokens=[int(t) for t in values["begin_suppress_tokens"] or []],
        renormalize_logits=bool(values["renormalize_logits"]),
        # transformers keeps the tokens that completed a stop string, and so do the token ids here;
        # include_stop_str_in_output (the engine's text) stays the face's choice
        stop=[stops] if isinstance(stops, str) else list(stops or []),
        max_time=float(values["max_time"]) if values["max_time"] is not None else None,
        output_scores=bool(values["output_scores"]),
        output_logits=bool(values["output_logits"]),
        speculative=speculative,
        json_schema=values["json_schema"],
        regex=values["regex"],
        choice=values["choice"],
        grammar=values["grammar"],
    ), _FIELD_NAMES)
    return DecodingPlan(
        sampling=params,
        num_beams=int(values["num_beams"]),
        num_return_sequences=int(values["num_return_sequences"]),
        length_penalty=float(values["length_penalty"]),
        early_stopping=values["early_stopping"],
        return_dict_in_generate=bool(values["return_dict_in_generate"]),
        uses_default_length=values["max_new_tokens"] is None and not explicit_max_length,
    )


def _prompt_lookup(values: Mapping[str, Any]) -> SpeculativeConfig | None:
    """prompt_lookup_num_tokens (and max_matching_ngram_size, transformers' default 2) as a setting."""
    num_tokens = values["prompt_lookup_num_tokens"]
    if not num_tokens:
        return None
    if int(values["num_beams"]) > 1:
        raise ValueError("prompt_lookup_num_tokens cannot be combined with beam search (num_beams > 1)")
    try:
        return SpeculativeConfig(
            "prompt_lookup", num_speculative_tokens=num_tokens, prompt_lookup_max=values["max_matching_ngram_size"] or 2
        )
    except ValueError as exc:
        message = str(exc).replace("num_speculative_tokens", "prompt_lookup_num_tokens")
        raise ValueError(message.replace("prompt_lookup_max", "max_matching_ngram_size")) from None


class DefaultLengthWarning(UserWarning):
    """Output ended at a default length limit nobody chose."""


def warn_if_default_length(
    plan: DecodingPlan, finished: list[tuple[int, str | None]], limit: int = DEFAULT_MAX_NEW_TOKENS, stacklevel: int = 2
) -> None:
    """Warn when some output (new token count, finish reason) stopped at the default `limit` because no
    length was set: transformers silently cuts answers at 20 tokens, a classic surprise."""
    if plan.uses_default_length and any(n >= limit and reason == "length" for n, reason in finished):
        warnings.warn(
            f"generation stopped at the default limit of {limit} new tokens because neither max_new_tokens nor "
            "max_length was set; the output is probably cut short: pass max_new_tokens=... to generate more",
            DefaultLengthWarning,
            stacklevel=stacklevel + 1,
        )


def to_sampling_params(settings: Mapping[str, Any], prompt_length: int | None = None) -> SamplingParams:
    """The per-request SamplingParams of transformers-named `settings` (see `plan_generation`)."""
    return plan_generation(settings, prompt_length).sampling


def eos_token_ids(eos: Any) -> list[int]:
    """eos_token_id as a list (it may be an int, a list or None)."""
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


# ---- validation: transformers' names mapped onto sampling_params' table ----------------------

# transformers name -> the table entry (`tokenloom.sampling_params.RANGES`) that holds its range
TRANSFORMERS_NAMES: dict[str, str] = {
    "max_length": "max_tokens",
    "max_new_tokens": "max_tokens",
    "min_length": "min_tokens",
    "min_new_tokens": "min_tokens",
    "do_sample": "do_sample",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "epsilon_cutoff": "epsilon_cutoff",
    "eta_cutoff": "eta_cutoff",
    "repetition_penalty": "repetition_penalty",
    "no_repeat_ngram_size": "no_repeat_ngram_size",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "num_beams": "num_beams",
    "num_return_sequences": "num_return_sequences",
    "length_penalty": "length_penalty",
    "max_time": "max_time",
    "seed": "seed",
    "suppress_tokens": "suppress_tokens",
    "begin_suppress_tokens": "begin_suppress_tokens",
    "bad_words_ids": "bad_words_ids",
    "stop_strings": "stop",
    "renormalize_logits": "renormalize_logits",
    "output_scores": "output_scores",
    "output_logits": "output_logits",
    "return_dict_in_generate": "flag",
    "use_cache": "flag",
}
# SamplingParams field -> transformers name, for errors raised while building SamplingParams
_FIELD_NAMES = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens", "stop": "stop_strings",
                "stop_token_ids": "eos_token_id"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(v: dict[str, Any]) -> None:
    for name, entry in TRANSFORMERS_NAMES.items():
        if v[name] is not None:
            check(entry, v[name], name)
    if v["stop_strings"] == "":
        raise ParameterError("stop_strings", "", "a non-empty string or a list of non-empty strings")
    if v["min_new_tokens"] is not None and v["max_new_tokens"] is not None and v["min_new_tokens"] > v["max_new_tokens"]:
        raise ParameterError(
            "min_new_tokens", v["min_new_tokens"], f"<= max_new_tokens ({v['max_new_tokens']})"
        )
    if v["do_sample"] and v["temperature"] == 0:
        raise ParameterError(
            "temperature", 0, "> 0 when do_sample=True",
            "temperature must be > 0 when do_sample=True, got 0 (use do_sample=False for greedy decoding)",
        )
    if not (v["early_stopping"] is True or v["early_stopping"] is False or v["early_stopping"] == "never"):
        raise ParameterError("early_stopping", v["early_stopping"], "True, False or 'never'")
    if v["num_return_sequences"] > 1:
        if v["num_beams"] == 1 and not v["do_sample"]:
            raise ParameterError(
                "num_return_sequences", v["num_return_sequences"], "1 with greedy decoding",
                f"num_return_sequences must be 1 with greedy decoding (do_sample=False, num_beams=1), got "
                f"{v['num_return_sequences']}; set do_sample=True or num_beams >= num_return_sequences",
            )
        if v["num_beams"] > 1 and v["num_return_sequences"] > v["num_beams"]:
            raise ParameterError(
                "num_return_sequences", v["num_return_sequences"], f"<= num_beams ({v['num_beams']}) in beam search"
            )
    if v["num_beams"] > 1:
        # the beam driver is transformers' deterministic beam search; these need hooks it does not have
        for name, off in (("do_sample", False), ("stop_strings", None), ("max_time", None), ("json_schema", None),
                          ("regex", None), ("choice", None), ("grammar", None)):
            if v[name] != off:
                raise ParameterError(
                    name, v[name], f"{off!r} with beam search",
                    f"{name}={v[name]!r} is not supported by tokenloom with beam search (num_beams="
                    f"{v['num_beams']}); leave it at {off!r} or use num_beams=1",
                )
    eos = v["eos_token_id"]
    if eos is not None:
        check("stop_token_ids", list(eos) if isinstance(eos, (list, tuple)) else [eos], "eos_token_id")
    for name in ("pad_token_id", "bos_token_id"):  # transformers only warns about negative ones
        if v[name] is not None:
            check_int(name, v[name], "a token id (an integer)", lambda x: True)
    if v["sequence_bias"] is not None:
        _sequence_bias(v["sequence_bias"], None)
    if v["logit_bias"] is not None:
        _sequence_bias(None, v["logit_bias"])


def _sequence_bias(sequence_bias: Any, logit_bias: Any) -> dict[tuple[int, ...], float]:
    """transformers' sequence_bias ({(ids...): bias} or [[[ids...], bias], ...]) plus OpenAI-style
    logit_bias ({token_id: bias}, keys may be strings as in JSON) as one {(ids...): bias} dict."""
    allowed = "a dict {tuple of token ids: bias} or a list of [list of token ids, bias] pairs"
    out: dict[tuple[int, ...], float] = {}
    if sequence_bias is not None:
        if isinstance(sequence_bias, Mapping):
            pairs = list(sequence_bias.items())
        elif isinstance(sequence_bias, (list, tuple)) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 for p in sequence_bias
        ):
            pairs = list(sequence_bias)
        else:
            raise ParameterError("sequence_bias", sequence_bias, allowed)
        for ids, bias in pairs:
            ids = (ids,) if _is_int(ids) else ids
            if not (isinstance(ids, (list, tuple)) and ids and all(is_token_id(t) for t in ids)):
                raise ParameterError("sequence_bias", ids, "keyed by non-empty sequences of token ids")
            check("token_bias", bias, "sequence_bias")
            out[tuple(int(t) for t in ids)] = float(bias)
    if logit_bias is not None:
        for key, bias in logit_bias_to_sequence_bias(logit_bias).items():
            out[key] = out.get(key, 0.0) + bias
    return out
