"""The Llama family (llama, mistral, SmolLM2): the whole forward pass in one file (L2)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from tokenloom.models.layers import Attention, DecoderConfig, RotaryDecoderLM, gated_layer

logger = logging.getLogger(__name__)


@dataclass
class LlamaConfig(DecoderConfig):
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LlamaConfig:
        heads = raw["num_attention_heads"]
        max_positions = raw.get("max_position_embeddings", 2048)
        # Mistral: every layer attends its last `sliding_window` positions. transformers' Llama ignores
        # a sliding_window key, and its Mistral ignores layer_types; so do we.
        window = raw.get("sliding_window") if raw.get("model_type") == "mistral" else None
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"} or None
        return cls._pick(
            raw,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            max_position_embeddings=max_positions,
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            sliding_window=window,
            layer_types=None,
        )


class LlamaForCausalLM(RotaryDecoderLM):
    """Llama: RMSNorm pre-norm blocks, rotary attention (optional biases), gated MLP."""

    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig) -> None:
        bias = config.attention_bias
        layers = [
            gated_layer(config, Attention.for_layer(config, i, qkv_bias=bias, o_bias=bias), config.mlp_bias)
            for i in range(config.num_hidden_layers)
        ]
        super().__init__(config, layers)
