"""Model configuration checks (L2): types, sane bounds and consistency of config.json values, checked
before a model is built. Every architecture's `from_dict` goes through them (`ModelConfig` wraps it):
the raw keys before any arithmetic on them, the finished config before any module is made.

config.json files and GGUF metadata come from strangers: a `num_hidden_layers` of 10**9 would build
layers until memory runs out, a string would fail deep inside torch, a NaN epsilon would make every
logit NaN. Each of those is a `ConfigError` naming the key and the value.
"""

from __future__ import annotations

import math
from typing import Any

from tokenloom.errors import ConfigError

# Upper bounds, far above every released model (Llama 3.1 405B: 126 layers, hidden 16384, 128 heads;
# Gemma 3: a 262k vocabulary; Llama 4 Scout: a 10M context), far below what would exhaust memory.
MAX_LAYERS = 1024
MAX_HIDDEN_SIZE = 1 << 17
MAX_INTERMEDIATE_SIZE = 1 << 20
MAX_HEADS = 4096
MAX_HEAD_DIM = 4096
MAX_VOCAB_SIZE = 1 << 23
MAX_POSITIONS = 1 << 27

# key -> (upper bound, None allowed)
_POSITIVE_INTS: dict[str, tuple[int, bool]] = {
    "vocab_size": (MAX_VOCAB_SIZE, False),
    "hidden_size": (MAX_HIDDEN_SIZE, False),
    "n_embd": (MAX_HIDDEN_SIZE, False),
    "num_hidden_layers": (MAX_LAYERS, False),
    "n_layer": (MAX_LAYERS, False),
    "num_attention_heads": (MAX_HEADS, False),
    "n_head": (MAX_HEADS, False),
    "num_key_value_heads": (MAX_HEADS, True),
    "head_dim": (MAX_HEAD_DIM, True),
    "intermediate_size": (MAX_INTERMEDIATE_SIZE, False),
    "n_inner": (MAX_INTERMEDIATE_SIZE, True),
    "max_position_embeddings": (MAX_POSITIONS, False),
    "n_positions": (MAX_POSITIONS, False),
    "n_ctx": (MAX_POSITIONS, True),
    "original_max_position_embeddings": (MAX_POSITIONS, True),
    "sliding_window": (MAX_POSITIONS, True),
    "sliding_window_pattern": (MAX_LAYERS, True),
}
_NON_NEGATIVE_INTS = {"max_window_layers": MAX_POSITIONS}
# key -> (strictly positive, None allowed)
_NUMBERS: dict[str, tuple[bool, bool]] = {
    "rms_norm_eps": (False, False),
    "layer_norm_epsilon": (False, False),
    "layer_norm_eps": (False, False),
    "rope_theta": (True, False),
    "rope_local_base_freq": (True, False),
    "query_pre_attn_scalar": (True, False),
    "partial_rotary_factor": (True, False),
    "final_logit_softcapping": (True, True),
    "attn_logit_softcapping": (True, True),
}
_BOOLS = (
    "tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx", "use_bidirectional_attention",
)
_STRINGS = ("model_type", "hidden_act", "hidden_activation", "activation_function")
_DICTS = ("rope_scaling", "rope_parameters", "text_config")
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64", "half", "float", "double", "auto"})
# Architectures whose head width is not hidden_size // heads when config.json leaves it out.
_OWN_HEAD_DIM = ("qwen3", "gemma3", "gemma3_text")


def _bad(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"config key {key!r} must be {expected}, got {value!r} ({type(value).__name__})")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_int(key: str, value: Any, upper: int) -> int:
    if not is_int(value) or value < 1:
        raise _bad(key, value, "a positive integer")
    if value > upper:
        raise ConfigError(f"config key {key!r} is {value}, beyond the sane bound of {upper}")
    return value


def check_number(key: str, value: Any, *, positive: bool) -> float:
    if not is_number(value) or not math.isfinite(value):
        raise _bad(key, value, "a finite number")
    if value < 0 or (positive and value == 0):
        raise _bad(key, value, "a positive number" if positive else "a non-negative number")
    return float(value)


def check_raw_config(raw: Any) -> None:
    """Types and bounds of the keys config.json holds, before `from_dict` computes with them."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a model config must be a JSON object, got {type(raw).__name__}")
    for key, (upper, nullable) in _POSITIVE_INTS.items():
        if key in raw and not (nullable and raw[key] is None):
            check_positive_int(key, raw[key], upper)
    for key, upper in _NON_NEGATIVE_INTS.items():
        value = raw.get(key)
        if value is not None and (not is_int(value) or not 0 <= value <= upper):
            raise _bad(key, value, f"an integer in [0, {upper}]")
    for key, (positive, nullable) in _NUMBERS.items():
        if key in raw and not (nullable and raw[key] is None):
            check_number(key, raw[key], positive=positive)
    for key in _BOOLS:
        if raw.get(key) is not None and not isinstance(raw[key], bool):
            raise _bad(key, raw[key], "true or false")
    for key in _STRINGS:
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise _bad(key, raw[key], "a string")
    for key in _DICTS:
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise _bad(key, raw[key], "an object")
    vocab = raw.get("vocab_size")
    limit = vocab if is_int(vocab) and vocab > 0 else 1 << 31
    for key in _TOKEN_IDS:
        value = raw.get(key)
        ids = value if isinstance(value, list) else [value]
        if key == "pad_token_id" and value == -1:
            continue  # old configs' "no pad token"
        if value is not None and not all(is_int(i) and 0 <= i < limit for i in ids):
            raise _bad(key, value, f"a token id in [0, {limit}) or a list of them")
    for key in ("torch_dtype", "dtype"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or value.removeprefix("torch.") not in _DTYPES):
            raise _bad(key, value, f"one of {', '.join(sorted(_DTYPES))}")
    layer_types = raw.get("layer_types")
    if layer_types is not None and (
        not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types)
    ):
        raise _bad("layer_types", layer_types, "a list of strings")
    heads = raw.get("num_attention_heads", raw.get("n_head"))
    hidden = raw.get("hidden_size", raw.get("n_embd"))
    own_head_dim = raw.get("model_type") in _OWN_HEAD_DIM or raw.get("head_dim") is not None
    if is_int(heads) and is_int(hidden) and not own_head_dim and hidden % heads:
        raise ConfigError(
            f"num_attention_heads={heads} does not divide hidden_size={hidden}: the head width would not be whole"
        )


def check_model_config(config: Any) -> None:
    """Consistency of a built config (derived fields included), before any module is made."""
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "max_position_embeddings"):
        upper, _ = _POSITIVE_INTS[key]
        check_positive_int(key, getattr(config, key), upper)
    if getattr(config, "intermediate_size", None) == 0:
        raise ConfigError("the config lacks 'intermediate_size' (or states 0)")
    if hasattr(config, "intermediate_size"):
        check_positive_int("intermediate_size", config.intermediate_size, MAX_INTERMEDIATE_SIZE)
    if config.num_attention_heads % config.num_key_value_heads:
        raise ConfigError(
            f"num_key_value_heads={config.num_key_value_heads} does not divide "
            f"num_attention_heads={config.num_attention_heads}"
        )
    if config.model_type == "gpt2" and config.num_attention_heads * config.head_dim != config.hidden_size:
        raise ConfigError(f"n_head={config.num_attention_heads} does not divide n_embd={config.hidden_size}")
    window = config.sliding_window
    if window is not None and window is not False:
        check_positive_int("sliding_window", window, MAX_POSITIONS)
    if config.layer_types is not None and len(config.layer_types) != config.num_hidden_layers:
        raise ConfigError(
            f"layer_types lists {len(config.layer_types)} layers, num_hidden_layers is {config.num_hidden_layers}"
        )
    for key in ("rms_norm_eps", "layer_norm_epsilon"):
        if hasattr(config, key):
            check_number(key, getattr(config, key), positive=False)
    for key in ("rope_theta", "query_pre_attn_scalar", "partial_rotary_factor"):
        if hasattr(config, key):
            check_number(key, getattr(config, key), positive=True)
    if hasattr(config, "partial_rotary_factor") and config.partial_rotary_factor > 1:
        raise _bad("partial_rotary_factor", config.partial_rotary_factor, "a number in (0, 1]")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(config, key, None) is not None:
            check_number(key, getattr(config, key), positive=True)
    _check_activation(config)
    _check_rope(config)


def _check_activation(config: Any) -> None:
    from tokenloom.models.layers import activation

    for key in ("hidden_act", "hidden_activation", "activation_function"):
        if hasattr(config, key):
            try:
                activation(getattr(config, key))
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"config key {key!r}: {exc}") from exc


def _check_rope(config: Any) -> None:
    """Each rope table the model will build can be built, and is finite."""
    import torch

    from tokenloom.models.layers import rope_inv_freq

    tables: list[tuple[str, float, Any]] = []
    if isinstance(getattr(config, "rope_parameters", None), dict) and config.rope_parameters:
        for layer_type, params in config.rope_parameters.items():
            if not isinstance(params, dict):
                raise _bad(f"rope_parameters[{layer_type!r}]", params, "an object")
            theta = check_number(f"rope_parameters[{layer_type!r}].rope_theta", params.get("rope_theta"),
                                 positive=True)
            tables.append((f"rope_parameters[{layer_type!r}]", theta,
                           {k: v for k, v in params.items() if k != "rope_theta"} or None))
    elif hasattr(config, "rope_theta"):
        scaling = getattr(config, "rope_scaling", None)
        if scaling is not None and not isinstance(scaling, dict):
            raise _bad("rope_scaling", scaling, "an object")
        if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "longrope":
            _check_longrope(config, scaling)
            return
        tables.append(("rope_scaling", config.rope_theta, scaling))
    dim = getattr(config, "rotary_dim", config.head_dim)
    for key, theta, scaling in tables:
        try:
            inv_freq, attention_scaling = rope_inv_freq(dim, theta, scaling)
        except (ValueError, TypeError, KeyError, ZeroDivisionError, AttributeError) as exc:
            raise ConfigError(f"config key {key!r} = {scaling!r} cannot make a rope table: {exc!r}") from exc
        if not bool(torch.isfinite(inv_freq).all()) or not math.isfinite(attention_scaling):
            raise ConfigError(f"config key {key!r} = {scaling!r} gives a rope table that is not finite")


def _check_longrope(config: Any, scaling: dict[str, Any]) -> None:
    half = getattr(config, "rotary_dim", config.head_dim) // 2
    for name in ("short_factor", "long_factor"):
        factors = scaling.get(name)
        if (
            not isinstance(factors, list) or len(factors) != half
            or not all(is_number(f) and math.isfinite(f) and f > 0 for f in factors)
        ):
            raise ConfigError(
                f"rope_scaling.{name} must list {half} positive numbers (one per rotary frequency), got "
                f"{str(factors)[:80]}"
            )
    original = getattr(config, "original_max_position_embeddings", None)
    check_positive_int("original_max_position_embeddings", original, MAX_POSITIONS)
    for key in ("factor", "attention_factor"):
        if scaling.get(key) is not None:
            check_number(f"rope_scaling.{key}", scaling[key], positive=True)


def declared_layers(raw: dict[str, Any]) -> int | None:
    """num_hidden_layers as config.json states it (GPT-2's n_layer, a multimodal text_config's)."""
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    value = text.get("num_hidden_layers", text.get("n_layer"))
    return value if is_int(value) else None
