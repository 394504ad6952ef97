"""Primitives shared by the architectures (L2): norms, rotary embedding, MLPs, attention and decoder
blocks over the paged KV cache, and the rotary decoder stack most architectures are built from.
Module attributes carry the Hugging Face parameter names."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.attention.decode import DecodeMetadata
from tokenloom.attention.paged import AttentionMetadata, paged_attention
from tokenloom.cache.kv_cache import KVCache
from tokenloom.models.base import CausalLM, ModelConfig
from tokenloom.models.fused_decode import FusedDecode
from tokenloom.models.linear import Embedding, Linear

# cos, sin: [num_tokens, 1, rotary_dim]; sin's first half negated (see apply_rotary)
Rope = tuple[torch.Tensor, torch.Tensor]


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dimension, in float32 (the norms differ only in how they weight it)."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """RMS normalisation computed in float32, as transformers' LlamaRMSNorm."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # torch's fused kernel: one op instead of six, and in float32 bit-identical to the formula
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * rms_normalize(x, self.eps).to(x.dtype)


class Conv1D(nn.Module):
    """GPT-2's linear layer: weight stored [in_features, out_features], as in its checkpoints."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # addmm as transformers' Conv1D, so results agree to the last bit
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


# Checkpoint module names -> (fused module, row block): the loader fills one fused projection from the
# separate q/k/v and gate/up tensors of a checkpoint (`packed_modules_mapping` of the model classes).
PACKED_MODULES: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), the Llama-family MLP, with gate and up fused into one
    `gate_up_proj` (gate rows first) that the loader fills from gate_proj and up_proj."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool = False) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias, [intermediate_size] * 2)
        self.down_proj = Linear(intermediate_size, hidden_size, bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act(gate) * up)


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    # transformers' NewGELUActivation, written out: F.gelu(approximate="tanh") rounds differently
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def activation(name: str):
    if name in ("silu", "swish"):
        return F.silu
    if name == "gelu":
        return F.gelu
    if name == "gelu_new":
        return _gelu_new
    if name in ("gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise ValueError(
        f"hidden_act={name!r} is not supported (use silu, gelu, gelu_new, gelu_pytorch_tanh or relu)"
    )


def rope_inv_freq(head_dim: int, base: float, scaling: dict[str, Any] | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] and the attention scaling factor, as transformers
    computes them for the 'default', 'linear' and 'llama3' rope types."""
    # Built on the CPU explicitly: models are instantiated under the meta device.
    steps = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float()
    inv_freq = 1.0 / (base ** (steps / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq, 1.0
    assert scaling is not None
    if rope_type == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope_type == "llama3":
        factor = scaling["factor"]
        low_freq_factor = scaling["low_freq_factor"]
        high_freq_factor = scaling["high_freq_factor"]
        old_context_len = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, inv_freq_llama), 1.0
    raise ValueError(f"rope_type={rope_type!r} is not supported (use default, linear or llama3)")


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions; computed once per step and shared by all layers.
    `head_dim` is the number of rotated dimensions (less than the head for partial rotary)."""

    def __init__(self, head_dim: int, base: float, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = rope_inv_freq(head_dim, base, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype, attn_meta: AttentionMetadata | None = None
    ) -> Rope:
        # positions: [num_tokens] -> cos, sin: [num_tokens, 1, head_dim]; the table depends on the
        # positions alone (attn_meta is for tables that also depend on each sequence's length)
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        return rope_tables(freqs, self.attention_scaling, dtype)


def rope_tables(freqs: torch.Tensor, attention_scaling: float, dtype: torch.dtype) -> Rope:
    """freqs [num_tokens, rotary_dim // 2] -> cos, sin [num_tokens, 1, rotary_dim], as transformers
    computes them, except that sin's first half is negated: apply_rotary's rotation then needs no
    negation of its own."""
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * attention_scaling).to(dtype)
    half = freqs.shape[-1]
    sin = (emb.sin() * attention_scaling).to(dtype)
    sin[:, :half].neg_()
    return cos[:, None, :], sin[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [num_tokens, num_heads, head_dim] rotated by a rope table (rope_tables); only the first
    cos.shape[-1] dims rotate (partial rotary). transformers' x * cos + rotate_half(x) * sin, with
    rotate_half(x) = cat(-x2, x1): roll(x) = cat(x2, x1) times the half-negated sin is the same
    product to the last bit ((-a) * b == -(a * b)), in one op instead of four."""
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), dim=-1)
    return x * cos + x.roll(rotary_dim // 2, dims=-1) * sin


class RotaryAttention(nn.Module):
    """Rotary self-attention over the paged cache, from the q/k/v projections (made by `project`,
    which subclasses define) to o_proj; optional QK-norm (RMSNorm over head_dim before RoPE)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        layer_index: int,
        *,
        o_bias: bool = False,
        qk_norm_eps: float | None = None,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window
        self.o_proj = Linear(num_heads * head_dim, hidden_size, o_bias)
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None

    @classmethod
    def for_layer(cls, config: ModelConfig, layer_index: int, **options: Any) -> RotaryAttention:
        """The attention of layer `layer_index`: sizes and sliding window from the config."""
        return cls(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            layer_index,
            sliding_window=config.window_for_layer(layer_index),
            **options,
        )

    def project(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [num_tokens, hidden_size] -> flat q, k, v [num_tokens, heads * head_dim]."""
        raise NotImplementedError

    def forward(
        self, hidden: torch.Tensor, rope: Rope, kv_cache: KVCache, attn_meta: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q, k, v = self.project(hidden)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = paged_attention(
            q, k, v, kv_cache, self.layer_index, attn_meta, self.scale, sliding_window=self.sliding_window
        )
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class Attention(RotaryAttention):
    """q, k and v from one fused `qkv_proj` (rows q, then k, then v) that the loader fills from the
    checkpoint's q_proj/k_proj/v_proj (Llama, Qwen2, Qwen3, Gemma 3); `qkv_bias` for those three. The
    other arguments are RotaryAttention's."""

    def __init__(self, *args: Any, qkv_bias: bool = False, **options: Any) -> None:
        super().__init__(*args, **options)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = Linear(self.hidden_size, q_size + 2 * kv_size, qkv_bias, self.qkv_sizes)

    def project(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv_proj(hidden).split(self.qkv_sizes, dim=-1)
        return q, k, v


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x))."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(
        self, hidden: torch.Tensor, rope: Rope, kv_cache: KVCache, attn_meta: AttentionMetadata
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), rope, kv_cache, attn_meta)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


def gated_layer(config: DecoderConfig, attention: nn.Module, mlp_bias: bool = False) -> DecoderLayer:
    """The Llama-family layer: `attention` and the config's gated MLP in a pre-norm DecoderLayer."""
    mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, mlp_bias)
    return DecoderLayer(attention, mlp, config.hidden_size, config.rms_norm_eps)


@dataclass
class DecoderConfig(ModelConfig):
    """The fields of Llama-like decoders (RMSNorm, rotary, gated MLP)."""

    intermediate_size: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    hidden_act: str = "silu"

    @staticmethod
    def common_values(raw: dict[str, Any]) -> dict[str, Any]:
        """Derived values every Llama-like config.json states the same way: kv heads, head width,
        rope (transformers 5's `rope_parameters` or the older `rope_theta` + `rope_scaling`)."""
        heads = raw["num_attention_heads"]
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        return {
            "num_key_value_heads": raw.get("num_key_value_heads") or heads,
            "head_dim": raw.get("head_dim") or raw["hidden_size"] // heads,
            "rope_theta": float(raw.get("rope_theta", rope.get("rope_theta", 10000.0))),
            "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"} or None,
            "tie_word_embeddings": bool(raw.get("tie_word_embeddings", False)),
        }


class RotaryDecoder(nn.Module):
    """HF's `model.`: embed_tokens, the decoder layers, the final norm and one rope table for all."""

    def __init__(self, config: DecoderConfig, layers: list[nn.Module], rotary_emb: nn.Module) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = rotary_emb


class RotaryDecoderLM(CausalLM):
    """`model` (a RotaryDecoder) and `lm_head`; the architectures supply their layers (and their rope
    table when it is not the config's plain one)."""

    packed_modules_mapping = PACKED_MODULES

    def __init__(
        self, config: DecoderConfig, layers: list[nn.Module], rotary_emb: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.config = config
        if rotary_emb is None:
            rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.model = RotaryDecoder(config, layers, rotary_emb)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache, attn_meta: AttentionMetadata
    ) -> torch.Tensor:
        if isinstance(attn_meta, DecodeMetadata) and not input_ids.is_cuda and not torch.compiler.is_compiling():
            fused = self.fused_decode()
            if fused is not None:
                return fused.run(attn_meta, kv_cache)
        hidden = self.model.embed_tokens(input_ids)  # [num_tokens, hidden_size]
        rope = self.model.rotary_emb(positions, hidden.dtype, attn_meta)
        for layer in self.model.layers:
            hidden = layer(hidden, rope, kv_cache, attn_meta)
        return self.model.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    _fused: FusedDecode | None | bool = False  # False: not planned yet

    def fused_decode(self) -> FusedDecode | None:
        """The fused CPU decode step for this model (planned on first use), or None where it does
        not apply: decode-only steps then run the layers' torch ops."""
        if self._fused is False:
            self._fused = FusedDecode.plan(self)
        return self._fused  # type: ignore[return-value]

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        self._fused = False  # moved or cast: plan again
        return super()._apply(fn, recurse)
