"""GGUF metadata -> config.json keys (L3): llama.cpp's keys mapped the way transformers' GGUF loader maps
them (`GGUF_CONFIG_MAPPING`), plus the architecture defaults and rope parameters GGUF files leave implicit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenloom.errors import UnsupportedModelError
from tokenloom.loading.gguf_rope import ROPE_FREQS, refuse_unmapped_rope_tensors

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
