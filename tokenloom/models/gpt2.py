"""GPT-2 (L2): learned position embeddings (`wpe`), LayerNorm pre-norm blocks, Conv1D projections
(weights [in, out] as in its checkpoints: `c_attn`, `c_proj`, `c_fc`), gelu_new, lm_head tied to
`wte`. Attribute names are transformers' (`transformer.h.N.attn.c_attn`, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.attention.paged import AttentionMetadata, paged_attention
from tokenloom.cache.kv_cache import KVCache
from tokenloom.models.base import CausalLM, ModelConfig
from tokenloom.models.layers import Conv1D, activation
from tokenloom.models.linear import Linear


@dataclass
class GPT2Config(ModelConfig):
    intermediate_size: int = 0
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    # reorder_and_upcast_attn only changes transformers' eager path to compute the scores in float32;
    # SDPA here (as transformers' default SDPA path) computes them in the model dtype.

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GPT2Config:
        hidden = raw.get("n_embd", raw.get("hidden_size", 768))
        heads = raw.get("n_head", raw.get("num_attention_heads", 12))
        return cls._pick(
            raw,
            hidden_size=hidden,
            num_hidden_layers=raw.get("n_layer", raw.get("num_hidden_layers", 12)),
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=hidden // heads,
            max_position_embeddings=raw.get("n_positions", raw.get("max_position_embeddings", 1024)),
            intermediate_size=raw.get("n_inner") or 4 * hidden,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),  # GPT2Config's default
        )


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= float(layer_index + 1)
        self.c_attn = Conv1D(config.hidden_size, 3 * config.hidden_size)
        self.c_proj = Conv1D(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor, kv_cache: KVCache, attn_meta: AttentionMetadata) -> torch.Tensor:
        num_tokens, hidden_size = hidden.shape
        # [num_tokens, 3 * hidden] -> 3 x [num_tokens, num_heads, head_dim]
        q, k, v = (
            x.view(num_tokens, self.num_heads, self.head_dim) for x in self.c_attn(hidden).split(hidden_size, -1)
        )
        out = paged_attention(q, k, v, kv_cache, self.layer_index, attn_meta, self.scale)
        return self.c_proj(out.reshape(num_tokens, hidden_size))


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = Conv1D(config.hidden_size, config.intermediate_size)
        self.c_proj = Conv1D(config.intermediate_size, config.hidden_size)
        self.act = activation(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_index: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_index)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, hidden: torch.Tensor, kv_cache: KVCache, attn_meta: AttentionMetadata) -> torch.Tensor:
        hidden = hidden + self.attn(self.ln_1(hidden), kv_cache, attn_meta)
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2Model(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        # plain nn.Embedding (always dense: the tied head reads wte.weight as a matrix); `_weight`
        # skips the random initialisation, which loading overwrites anyway
        vocab, hidden, positions = config.vocab_size, config.hidden_size, config.max_position_embeddings
        self.wte = nn.Embedding(vocab, hidden, _weight=torch.empty(vocab, hidden))
        self.wpe = nn.Embedding(positions, hidden, _weight=torch.empty(positions, hidden))
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)


class GPT2LMHeadModel(CausalLM):
    """`transformer` and, when the output projection is not tied to `wte`, `lm_head`."""

    config_class = GPT2Config

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        # Tied: no lm_head parameter at all, so a checkpoint's copy (or its absence) cannot untie it.
        self.lm_head = (
            None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size)
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache, attn_meta: AttentionMetadata
    ) -> torch.Tensor:
        hidden = self.transformer.wte(input_ids) + self.transformer.wpe(positions)  # [num_tokens, hidden]
        for block in self.transformer.h:
            hidden = block(hidden, kv_cache, attn_meta)
        return self.transformer.ln_f(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return F.linear(hidden, self.transformer.wte.weight)
        return self.lm_head(hidden)
