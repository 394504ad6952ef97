"""Qwen2 (L2): the Llama block with biases on the q/k/v projections (not o_proj) and, when the
config asks for it, sliding-window attention on the layers from `max_window_layers` on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenloom.models.layers import Attention, DecoderConfig, RotaryDecoderLM, gated_layer


def qwen_window_and_layer_types(raw: dict[str, Any]) -> tuple[int | None, list[str]]:
    """sliding_window and layer_types as transformers' Qwen2Config/Qwen3Config derive them: the
    window counts only with use_sliding_window, and then only layers >= max_window_layers slide
    (unless config.json lists layer_types itself)."""
    window = raw.get("sliding_window", 4096) if raw.get("use_sliding_window", False) else None
    layer_types = raw.get("layer_types")
    if layer_types is None:
        first_sliding = raw.get("max_window_layers", 28)
        layer_types = [
            "sliding_attention" if window is not None and i >= first_sliding else "full_attention"
            for i in range(raw["num_hidden_layers"])
        ]
    return window, list(layer_types)


@dataclass
class Qwen2Config(DecoderConfig):
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Qwen2Config:
        window, layer_types = qwen_window_and_layer_types(raw)
        return cls._pick(raw, **cls.common_values(raw), sliding_window=window, layer_types=layer_types)


class Qwen2ForCausalLM(RotaryDecoderLM):
    """Qwen2: RMSNorm pre-norm blocks, rotary attention with q/k/v biases, gated MLP."""

    config_class = Qwen2Config

    def __init__(self, config: Qwen2Config) -> None:
        attentions = [Attention.for_layer(config, i, qkv_bias=True) for i in range(config.num_hidden_layers)]
        super().__init__(config, [gated_layer(config, attention) for attention in attentions])
