"""Qwen3 (L2): the Llama block with QK-norm (RMSNorm over head_dim on q and k before RoPE), a head
width of its own (`head_dim`), optional projection biases (`attention_bias`), and Qwen2's rule for
sliding-window layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenloom.models.layers import Attention, DecoderConfig, RotaryDecoderLM, gated_layer
from tokenloom.models.qwen2 import qwen_window_and_layer_types


@dataclass
class Qwen3Config(DecoderConfig):
    attention_bias: bool = False

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Qwen3Config:
        window, layer_types = qwen_window_and_layer_types(raw)
        values = cls.common_values(raw)
        values["head_dim"] = raw.get("head_dim") or 128  # Qwen3Config's default, not hidden // heads
        return cls._pick(raw, **values, sliding_window=window, layer_types=layer_types)


class Qwen3ForCausalLM(RotaryDecoderLM):
    """Qwen3: RMSNorm pre-norm blocks, rotary attention with QK-norm, gated MLP."""

    config_class = Qwen3Config

    def __init__(self, config: Qwen3Config) -> None:
        bias, eps = config.attention_bias, config.rms_norm_eps
        attentions = [
            Attention.for_layer(config, i, qkv_bias=bias, o_bias=bias, qk_norm_eps=eps)
            for i in range(config.num_hidden_layers)
        ]
        super().__init__(config, [gated_layer(config, attention) for attention in attentions])
