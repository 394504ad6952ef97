"""Phi-3 (L2): the Llama block with fused projections, kept fused as in transformers' Phi3 modules
(`self_attn.qkv_proj`, `mlp.gate_up_proj`) and split after the matmul; optional partial rotary
(`partial_rotary_factor`), LongRoPE scaling, and a sliding window on every layer when the config
sets one."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tokenloom.attention.paged import AttentionMetadata
from tokenloom.models.layers import (
    DecoderConfig,
    DecoderLayer,
    Rope,
    RotaryAttention,
    RotaryDecoderLM,
    RotaryEmbedding,
    activation,
    rope_tables,
)
from tokenloom.models.linear import Linear


@dataclass
class Phi3Config(DecoderConfig):
    rms_norm_eps: float = 1e-5  # Phi3Config's default
    partial_rotary_factor: float = 1.0
    original_max_position_embeddings: int | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Phi3Config:
        values = cls.common_values(raw)
        scaling = dict(values["rope_scaling"] or {})
        # transformers keeps the factor in rope_parameters; older config.json files state it at the top
        factor = float(scaling.pop("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type in ("su", "yarn"):  # the names of longrope in early Phi-3 configs, as transformers reads them
            rope_type = "longrope"
        if rope_type not in ("default", "longrope"):
            raise ValueError(f"rope_type={rope_type!r} is not supported for phi3 (use default or longrope)")
        scaling["rope_type"] = rope_type
        return cls._pick(
            raw,
            **{**values, "rope_scaling": scaling if rope_type == "longrope" else None},
            partial_rotary_factor=factor,
            original_max_position_embeddings=scaling.get(
                "original_max_position_embeddings", raw.get("original_max_position_embeddings")
            ),
            # transformers' Phi3 masks every layer with the window when one is set (no layer_types)
            sliding_window=raw.get("sliding_window"),
        )

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


class LongRotaryEmbedding(nn.Module):
    """LongRoPE as transformers' Phi3 applies it: inverse frequencies divided by `short_factor`, or by
    `long_factor` for a sequence longer than `original_max_position_embeddings`, and cos/sin scaled
    by the attention factor. Each sequence decides from its own length at the end of the step, as
    transformers does for one sequence per forward call. Known difference: when generation takes a
    sequence past the limit, transformers' generate drops its cache and recomputes the whole
    sequence with the long factors once; here the keys already cached keep the short ones (so do
    the chunks of a long prompt prefilled before the chunk that crosses the limit)."""

    def __init__(self, config: Phi3Config) -> None:
        super().__init__()
        scaling = config.rope_scaling or {}
        self.original_max_positions = int(config.original_max_position_embeddings or 0)
        if not self.original_max_positions:
            raise ValueError("longrope needs original_max_position_embeddings in config.json")
        factor = scaling.get("factor") or config.max_position_embeddings / self.original_max_positions
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(
                1 + math.log(factor) / math.log(self.original_max_positions)
            )
        self.attention_scaling = float(attention_factor)
        dim = config.rotary_dim
        # on the CPU explicitly: models are instantiated under the meta device
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
        base = config.rope_theta**exponents
        for name in ("short", "long"):
            factors = torch.tensor(scaling[f"{name}_factor"], dtype=torch.float32, device="cpu")
            self.register_buffer(f"{name}_inv_freq", 1.0 / (factors * base), persistent=False)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype, attn_meta: AttentionMetadata | None = None
    ) -> Rope:
        if attn_meta is None:
            lengths = positions + 1
        else:  # each token's sequence length at the end of this step: [num_tokens]
            lengths = torch.repeat_interleave(
                torch.tensor(attn_meta.context_lens), torch.tensor(attn_meta.query_lens)
            ).to(positions.device)
        is_long = (lengths > self.original_max_positions)[:, None]
        inv_freq = torch.where(is_long, self.long_inv_freq[None, :], self.short_inv_freq[None, :])
        return rope_tables(positions.float()[:, None] * inv_freq.float(), self.attention_scaling, dtype)


class Phi3Attention(RotaryAttention):
    """One qkv_proj whose output rows are q, then k, then v."""

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__(*args, **options)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = Linear(self.hidden_size, q_size + 2 * kv_size, False, self.qkv_sizes)

    def project(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv_proj(hidden).split(self.qkv_sizes, dim=-1)
        return q, k, v


class Phi3MLP(nn.Module):
    """down(up * act(gate)) with gate and up from one gate_up_proj (gate rows first)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, False, [intermediate_size] * 2)
        self.down_proj = Linear(intermediate_size, hidden_size)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.act(gate))


class Phi3ForCausalLM(RotaryDecoderLM):
    """Phi-3: RMSNorm pre-norm blocks, fused-qkv rotary attention, fused gate/up MLP."""

    config_class = Phi3Config
    packed_modules_mapping: dict[str, tuple[str, int]] = {}  # its checkpoints store qkv_proj / gate_up_proj

    def __init__(self, config: Phi3Config) -> None:
        layers = [
            DecoderLayer(
                Phi3Attention.for_layer(config, i),
                Phi3MLP(config.hidden_size, config.intermediate_size, config.hidden_act),
                config.hidden_size,
                config.rms_norm_eps,
            )
            for i in range(config.num_hidden_layers)
        ]
        if config.rope_scaling is None:
            rope: nn.Module = RotaryEmbedding(config.rotary_dim, config.rope_theta)
        else:
            rope = LongRotaryEmbedding(config)
        super().__init__(config, layers, rope)
