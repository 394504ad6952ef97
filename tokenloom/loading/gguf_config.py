"""GGUF metadata -> config.json keys (L3): llama.cpp's keys mapped the way transformers' GGUF loader maps
them (`GGUF_CONFIG_MAPPING`), plus the architecture defaults and rope parameters GGUF files leave implicit."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

from tokenloom.errors import ConfigError, UnsupportedModelError
from tokenloom.loading.gguf_arrays import GGUFStrings
from tokenloom.loading.gguf_rope import ROPE_FREQS, refuse_unmapped_rope_tensors
from tokenloom.loading.gguf_tokenizer_checks import check_tokenizer_metadata
from tokenloom.models import config_checks

logger = logging.getLogger(__name__)

# llama.cpp key (after "<arch>.") -> config.json key; transformers' GGUF_CONFIG_MAPPING for these archs.
_DECODER_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
_ARCH_KEYS: dict[str, dict[str, str]] = {
    # rope.dimension_count is head_dim only for llama/mistral (transformers' note)
    "llama": {**_DECODER_KEYS, "rope.dimension_count": "head_dim"},
    "mistral": {**_DECODER_KEYS, "rope.dimension_count": "head_dim"},
    "qwen2": _DECODER_KEYS,
    "qwen3": _DECODER_KEYS,
    "phi3": _DECODER_KEYS,
    "gemma3": {
        **_DECODER_KEYS,
        "attention.key_length": "head_dim",
        "attention.sliding_window": "sliding_window",
    },
    "gpt2": {
        "block_count": "n_layer",
        "context_length": "n_ctx",
        "embedding_length": "n_embd",
        "feed_forward_length": "feed_forward_length",
        "attention.head_count": "n_head",
        "attention.layer_norm_epsilon": "layer_norm_epsilon",
    },
}
_GENERAL_KEYS = {"general.architecture": "model_type", "general.name": "_model_name_or_path"}
_TOKEN_ID_KEYS = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}
# Keys transformers leaves to its config classes' defaults but the file states: kept, as they describe
# this model rather than the class's reference checkpoint.
_EXTRA_KEYS: dict[str, dict[str, str]] = {
    "qwen3": {"attention.key_length": "head_dim"},
    "phi3": {"attention.sliding_window": "sliding_window"},
}
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3", "phi3", "gpt2")

# llama.cpp key (after "<arch>.") -> upper bound of a count it holds (sizes are positive integers)
_COUNT_BOUNDS = {
    "block_count": config_checks.MAX_LAYERS,
    "context_length": config_checks.MAX_POSITIONS,
    "embedding_length": config_checks.MAX_HIDDEN_SIZE,
    "feed_forward_length": config_checks.MAX_INTERMEDIATE_SIZE,
    "attention.head_count": config_checks.MAX_HEADS,
    "attention.head_count_kv": config_checks.MAX_HEADS,
    "attention.key_length": config_checks.MAX_HEAD_DIM,
    "attention.value_length": config_checks.MAX_HEAD_DIM,
    "rope.dimension_count": config_checks.MAX_HEAD_DIM,
    "attention.sliding_window": config_checks.MAX_POSITIONS,
    "vocab_size": config_checks.MAX_VOCAB_SIZE,
}
# llama.cpp key -> whether 0 is allowed (epsilons may be 0; a rope base may not)
_NUMBERS = {
    "attention.layer_norm_rms_epsilon": True,
    "attention.layer_norm_epsilon": True,
    "rope.freq_base": False,
    "rope.scaling.factor": True,
    "rope.scale_linear": True,
}
_BLOCK_INDEX = re.compile(r"^blk\.(\d+)\.")


def _scalar(key: str, value: Any, path: Path) -> Any:
    """A metadata value as one scalar: a one-element array is its element (transformers does so); a
    longer one holds per-layer values, which these architectures do not have."""
    if isinstance(value, list):
        if len(value) != 1:
            raise ConfigError(
                f"{path}: GGUF key {key!r} holds {len(value)} values {value[:4]!r}; one value is expected "
                "(per-layer values are not supported for this architecture)"
            )
        value = value[0]
    return value


def check_metadata(metadata: dict[str, Any], architecture: str, tensor_names: list[str], path: Path) -> None:
    """Types and bounds of the GGUF keys mapped to the config, and the layer count against the blocks
    the tensor table holds, before any of them is used (ConfigError naming the file, key and value)."""
    for leaf, upper in _COUNT_BOUNDS.items():
        key = f"{architecture}.{leaf}"
        if key in metadata:
            value = _scalar(key, metadata[key], path)
            if not config_checks.is_int(value) or value < 1:
                raise ConfigError(f"{path}: GGUF key {key!r} must be a positive integer, got {value!r}")
            if value > upper:
                raise ConfigError(f"{path}: GGUF key {key!r} is {value}, beyond the sane bound of {upper}")
    for leaf, zero_ok in _NUMBERS.items():
        key = f"{architecture}.{leaf}"
        if key in metadata:
            value = _scalar(key, metadata[key], path)
            if not config_checks.is_number(value) or not math.isfinite(value) or value < 0 or (
                value == 0 and not zero_ok
            ):
                expected = "a finite number >= 0" if zero_ok else "a finite positive number"
                raise ConfigError(f"{path}: GGUF key {key!r} must be {expected}, got {value!r}")
    check_tokenizer_metadata(metadata, path)  # token ids and the vocabulary, as the tokenizer checks them
    blocks = {int(m.group(1)) for name in tensor_names if (m := _BLOCK_INDEX.match(name))}
    declared = metadata.get(f"{architecture}.block_count")
    if declared is not None:
        declared = _scalar(f"{architecture}.block_count", declared, path)
        if declared > len(blocks) or (blocks and declared > max(blocks) + 1):
            raise ConfigError(
                f"{path}: GGUF key {architecture + '.block_count'!r} is {declared}, but the tensor table holds "
                f"{len(blocks)} blocks"
            )


def gguf_config(metadata: dict[str, Any], tensor_names: list[str], path: Path) -> dict[str, Any]:
    """config.json keys for a GGUF file's metadata, as transformers' GGUF loader derives them."""
    architecture = metadata.get("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {architecture!r} is not supported",
            hint=f"supported GGUF architectures: {', '.join(SUPPORTED_ARCHITECTURES)}",
        )
    # transformers' test is list membership on the parsed name, so only a name of exactly "mistral" counts
    updated = (
        "mistral" if architecture == "llama" and metadata.get("general.name") == "mistral" else architecture
    )
    check_metadata(metadata, architecture, tensor_names, path)
    arch_keys = {f"{architecture}.{key}": name for key, name in _ARCH_KEYS[updated].items()}
    extra_keys = {f"{architecture}.{key}": name for key, name in _EXTRA_KEYS.get(updated, {}).items()}

    config: dict[str, Any] = {"tie_word_embeddings": "output.weight" not in tensor_names}
    for key, value in metadata.items():
        name = _GENERAL_KEYS.get(key) or _TOKEN_ID_KEYS.get(key) or arch_keys.get(key) or extra_keys.get(key)
        if name is None:
            continue
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, str) and architecture in value:
            value = value.replace(architecture, updated)
        config[name] = value
    _drop_foreign_token_ids(config, metadata, path)
    if config["model_type"] == "gemma3":  # the GGUF holds the text backbone only
        config["model_type"] = "gemma3_text"
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in metadata:
        config["vocab_size"] = len(metadata["tokenizer.ggml.tokens"])

    config["torch_dtype"] = "float32"
    if any(name.endswith(".attn_q.bias") for name in tensor_names) and updated in ("llama", "mistral"):
        config["attention_bias"] = True
    if "rope_theta" in config and updated != "gemma3":
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_theta"]}
    if updated == "gemma3":
        _add_gemma3_defaults(config)
        _add_gemma3_rope_scaling(config, metadata, path)
    handled = {ROPE_FREQS} if updated in ("llama", "mistral") else set()
    refuse_unmapped_rope_tensors(updated, [n for n in tensor_names if n not in handled], path)
    if updated == "gpt2":
        config.setdefault("n_positions", config.get("n_ctx"))
        config.setdefault("n_inner", config.get("feed_forward_length"))
    return config


def _drop_foreign_token_ids(config: dict[str, Any], metadata: dict[str, Any], path: Path) -> None:
    """A special-token id outside the vocabulary names no token: left out, as the tokenizer leaves it."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = metadata.get(f"{metadata.get('general.architecture')}.vocab_size")
    listed = isinstance(tokens, (list, GGUFStrings)) and len(tokens) > 0
    size = vocab if config_checks.is_int(vocab) else len(tokens) if listed else None
    for key, name in _TOKEN_ID_KEYS.items():
        value = config.get(name)
        if size is not None and value is not None and not 0 <= value < size:
            logger.warning("%s: %s = %s is outside the vocabulary of %s tokens; ignored", path, key, value, size)
            del config[name]


def _add_gemma3_defaults(config: dict[str, Any]) -> None:
    """What Gemma3TextConfig supplies and a GGUF does not state (the values of every Gemma 3 release)."""
    config.setdefault("rope_theta", 1_000_000.0)
    config.setdefault("rope_local_base_freq", 10_000.0)
    config.setdefault("sliding_window_pattern", 6)
    config.setdefault("query_pre_attn_scalar", 256)
    config.setdefault("hidden_activation", "gelu_pytorch_tanh")
    config.setdefault("final_logit_softcapping", None)
    config.setdefault("attn_logit_softcapping", None)
    pattern = config["sliding_window_pattern"]
    config.setdefault(
        "layer_types",
        [
            "sliding_attention" if (i + 1) % pattern else "full_attention"
            for i in range(config.get("num_hidden_layers", 0))
        ],
    )
    config["rope_parameters"] = {
        "sliding_attention": {"rope_type": "default", "rope_theta": config["rope_local_base_freq"]},
        "full_attention": {"rope_type": "default", "rope_theta": config["rope_theta"]},
    }


def _add_gemma3_rope_scaling(config: dict[str, Any], metadata: dict[str, Any], path: Path) -> None:
    """llama.cpp's rope scaling keys as Gemma3TextConfig's legacy `rope_scaling`, which scales the
    global (full-attention) layers only: Gemma 3 4B and larger use linear scaling by 8 there."""
    scaling_type = metadata.get("gemma3.rope.scaling.type")
    factor = metadata.get("gemma3.rope.scaling.factor", metadata.get("gemma3.rope.scale_linear"))
    if scaling_type is not None and not isinstance(scaling_type, str):
        raise ConfigError(f"{path}: GGUF key 'gemma3.rope.scaling.type' must be a string, got {scaling_type!r}")
    if factor is not None and not config_checks.is_number(factor):
        raise ConfigError(f"{path}: GGUF key 'gemma3.rope.scaling.factor' must be a number, got {factor!r}")
    if scaling_type is None and factor is not None and float(factor) not in (0.0, 1.0):
        scaling_type = "linear"  # llama.cpp's default type when only a factor is given
    if scaling_type in (None, "none"):
        return
    if scaling_type != "linear" or factor is None or float(factor) <= 0:
        raise UnsupportedModelError(
            f"{path}: gemma3.rope.scaling.type={scaling_type!r} with factor {factor!r} is not supported",
            hint="Gemma 3 GGUF files use linear rope scaling with a positive gemma3.rope.scaling.factor",
        )
    config["rope_parameters"]["full_attention"] = {
        "rope_type": "linear",
        "factor": float(factor),
        "rope_theta": config["rope_theta"],
    }
