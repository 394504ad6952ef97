"""Gemma 3 text models (`gemma3_text`): the whole forward pass in one file (L2).

Numerics follow transformers' modeling_gemma3: embeddings scaled by sqrt(hidden_size) in the model
dtype, (1 + w) RMSNorm computed in float32, pre/post norms around attention and the MLP, RMSNorm on
queries and keys, scores scaled by query_pre_attn_scalar**-0.5, sliding and global layers
interleaved with a RoPE base of their own, gelu-tanh gated MLP, optional final logit softcapping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tokenloom.attention.paged import AttentionMetadata
from tokenloom.cache.kv_cache import KVCache
from tokenloom.models.base import CausalLM, ModelConfig
from tokenloom.models.layers import PACKED_MODULES, Attention, GatedMLP, RotaryEmbedding, rms_normalize
from tokenloom.models.linear import Embedding, Linear

SLIDING = "sliding_attention"
FULL = "full_attention"
# Gemma3TextConfig's defaults (transformers 5.24) for keys a config.json may leave out: Google's
# original multimodal configs state only what differs from them (gemma-3-4b's text_config has no
# vocab_size, head counts or head_dim).
_DEFAULT_ROPE_THETA = {FULL: 1_000_000.0, SLIDING: 10_000.0}
_DEFAULT_SLIDING_WINDOW_PATTERN = 6
_TEXT_CONFIG_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
}
# Keys of a full Gemma3Config (Gemma3ForConditionalGeneration) that apply to its text backbone.
_TOP_LEVEL_KEYS = ("tie_word_embeddings", "torch_dtype", "dtype")


@dataclass
class Gemma3TextConfig(ModelConfig):
    intermediate_size: int = 0
    rms_norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    final_logit_softcapping: float | None = None
    # Read but unused: transformers' Gemma3Attention never applies it (unlike Gemma 2's).
    attn_logit_softcapping: float | None = None
    # layer type -> rope parameters (rope_type, rope_theta and any scaling keys)
    rope_parameters: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Gemma3TextConfig:
        if isinstance(raw.get("text_config"), dict):  # a full Gemma3Config: the text backbone's keys
            top_level = {key: raw[key] for key in _TOP_LEVEL_KEYS if raw.get(key) is not None}
            raw = {**raw["text_config"], **top_level, "model_type": "gemma3_text"}
            # transformers' Gemma3ForConditionalGeneration never applies it (its Gemma3ForCausalLM
            # does); every Gemma 3 release has it null anyway
            raw["final_logit_softcapping"] = None
        raw = {**_TEXT_CONFIG_DEFAULTS, **raw}  # absent keys only: an explicit null (sliding_window) stays
        if raw.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention=True (EmbeddingGemma) is not supported; use False")
        num_layers = raw["num_hidden_layers"]
        layer_types = raw.get("layer_types")
        if layer_types is None:
            pattern = raw.get("sliding_window_pattern") or _DEFAULT_SLIDING_WINDOW_PATTERN
            layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
        if len(layer_types) != num_layers or set(layer_types) - {SLIDING, FULL}:
            raise ValueError(
                f"layer_types must list {num_layers} entries of {SLIDING!r} or {FULL!r}, got {layer_types}"
            )
        return cls._pick(
            raw,
            tie_word_embeddings=bool(raw["tie_word_embeddings"]),
            layer_types=list(layer_types),
            rope_parameters=_rope_parameters(raw),
        )


def _rope_parameters(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per layer type, as Gemma3TextConfig.convert_rope_params_to_dict builds them: a nested
    `rope_parameters` (transformers 5) wins; otherwise rope_theta / rope_local_base_freq and a legacy
    `rope_scaling` that applies to the global layers only."""
    given = raw.get("rope_parameters")
    params: dict[str, dict[str, Any]] = {}
    if isinstance(given, dict) and (SLIDING in given or FULL in given):
        params = {k: dict(v) for k, v in given.items() if isinstance(v, dict)}
    params.setdefault(FULL, {"rope_type": "default"})
    params.setdefault(SLIDING, {"rope_type": "default"})
    if isinstance(raw.get("rope_scaling"), dict):
        params[FULL].update(raw["rope_scaling"])
    params[FULL].setdefault("rope_theta", raw.get("rope_theta", _DEFAULT_ROPE_THETA[FULL]))
    params[SLIDING].setdefault("rope_theta", raw.get("rope_local_base_freq", _DEFAULT_ROPE_THETA[SLIDING]))
    return params


class Gemma3RMSNorm(nn.Module):
    """x / rms(x) * (1 + w), all in float32, cast back at the end (Gemma's own norm)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (rms_normalize(x, self.eps) * (1.0 + self.weight.float())).type_as(x)


class Gemma3Attention(Attention):
    """The shared rotary attention with Gemma's (1 + w) QK-norm and query_pre_attn_scalar scaling."""

    def __init__(self, config: Gemma3TextConfig, layer_index: int) -> None:
        bias = config.attention_bias
        super().__init__(
            config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
            layer_index, qkv_bias=bias, o_bias=bias, sliding_window=config.window_for_layer(layer_index),
        )
        self.scale = config.query_pre_attn_scalar**-0.5
        self.q_norm = Gemma3RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = Gemma3RMSNorm(config.head_dim, config.rms_norm_eps)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: Gemma3TextConfig, layer_index: int) -> None:
        super().__init__()
        assert config.layer_types is not None
        self.layer_type = config.layer_types[layer_index]
        self.self_attn = Gemma3Attention(config, layer_index)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_activation)
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = Gemma3RMSNorm(size, eps)
        self.post_attention_layernorm = Gemma3RMSNorm(size, eps)
        self.pre_feedforward_layernorm = Gemma3RMSNorm(size, eps)
        self.post_feedforward_layernorm = Gemma3RMSNorm(size, eps)

    def forward(self, hidden, rope, kv_cache, attn_meta):
        attn = self.self_attn(self.input_layernorm(hidden), rope, kv_cache, attn_meta)
        hidden = hidden + self.post_attention_layernorm(attn)
        mlp = self.mlp(self.pre_feedforward_layernorm(hidden))
        return hidden + self.post_feedforward_layernorm(mlp)


class Gemma3TextModel(nn.Module):
    def __init__(self, config: Gemma3TextConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Gemma3RMSNorm(config.hidden_size, config.rms_norm_eps)
        # One table per layer type, each with its own base (and scaling, for the global layers).
        self.rotary_emb = nn.ModuleDict(
            {
                layer_type: RotaryEmbedding(
                    config.head_dim,
                    float(params["rope_theta"]),
                    {k: v for k, v in params.items() if k != "rope_theta"} or None,
                )
                for layer_type, params in config.rope_parameters.items()
                if layer_type in set(config.layer_types or ())
            }
        )


class Gemma3ForCausalLM(CausalLM):
    config_class = Gemma3TextConfig
    packed_modules_mapping = PACKED_MODULES

    def __init__(self, config: Gemma3TextConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Gemma3TextModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        attn_meta: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = self.model.embed_tokens(input_ids)  # [num_tokens, hidden_size]
        # transformers keeps the scale as a float32 tensor and casts it to the weights' dtype
        hidden = hidden * torch.tensor(self.config.hidden_size**0.5).to(hidden.dtype)
        ropes = {name: emb(positions, hidden.dtype) for name, emb in self.model.rotary_emb.items()}
        for layer in self.model.layers:
            hidden = layer(hidden, ropes[layer.layer_type], kv_cache, attn_meta)
        return self.model.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
