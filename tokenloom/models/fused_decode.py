"""The decode step of Llama-family decoders with fused CPU ops (L2).

An eager decode step of SmolLM2 runs about 35 torch ops per layer besides its four matmuls, each a
few microseconds of dispatch on vectors of a few hundred numbers: that, not the matmuls, was most of
a single-stream step. Here each layer is its four projections (the int4 kernel, or the dense copy
for calls wider than the kernel's rows) and four calls into `kernels/cpu_decode.c`:

    residual add + RMSNorm (+ cast for the kernel)  ->  qkv_proj
    rotary on q and k + KV-cache write              ->  paged decode attention (+ cast)  ->  o_proj
    residual add + RMSNorm (+ cast)                 ->  gate_up_proj
    SiLU(gate) * up (+ cast)                        ->  down_proj

The numerics are the eager path's: float32 activations and residual stream, rounded to bfloat16
only where the eager path casts for the kernel. Used for decode-only steps (`DecodeMetadata`) on
the CPU, in the default (quantized) mode, for layers of the plain Llama shape (no biases, QK-norm,
sliding window or partial rotary); everything else, and every step of the exact mode, stays eager.
A lone sequence's attention over more than `C_ATTENTION_MAX_KEYS` keys goes through torch's batched
matmuls, which use every thread, instead of the single-threaded C loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenloom.attention.decode import DecodeMetadata
from tokenloom.attention.paged import _attend
from tokenloom.cache.kv_cache import KVCache
from tokenloom.kernels import cpu_decode
from tokenloom.kernels.cpu_decode import BFLOAT16, FLOAT32, CpuDecodeOps
from tokenloom.models.linear import Int4Linear, Int8Linear, QuantizedLinear

# A lone sequence with more keys than this attends through torch's two batched matmuls over a view
# of the pool, which run on every thread; the single-threaded C loop is faster below it, and for
# several rows (torch gathers their blocks first). Measured in docs/bench-cpu.md.
C_ATTENTION_MAX_KEYS = int(os.environ.get("TOKENLOOM_C_ATTENTION_MAX_KEYS", "1024"))


@dataclass
class _Layer:
    ln1: torch.nn.Module  # RMSNorm modules (their weights are read at each step)
    ln2: torch.nn.Module
    qkv: QuantizedLinear
    o: QuantizedLinear
    gate_up: QuantizedLinear
    down: QuantizedLinear
    index: int


def _plain_norm(norm: torch.nn.Module) -> bool:
    from tokenloom.models.layers import RMSNorm

    return type(norm) is RMSNorm and norm.weight.dtype == torch.float32 and norm.weight.is_contiguous()


def _plain_linear(linear: torch.nn.Module) -> bool:
    return isinstance(linear, (Int4Linear, Int8Linear)) and linear.bias is None


class FusedDecode:
    """The fused decode step of one model (see the module docstring); `plan` says whether it applies."""

    def __init__(self, model: torch.nn.Module, layers: list[_Layer], ops: CpuDecodeOps) -> None:
        self.model = model
        self.layers = layers
        self.ops = ops
        first = model.model.layers[0].self_attn
        self.heads, self.kv_heads, self.head_dim = first.num_heads, first.num_kv_heads, first.head_dim
        self.scale = float(first.scale)
        self.hidden_size = model.config.hidden_size
        self.intermediate = layers[0].gate_up.out_features // 2

    @classmethod
    def plan(cls, model: torch.nn.Module) -> FusedDecode | None:
        """The fused step for `model`, or None when some part of it is not the plain Llama shape,
        its weights are not quantized (the exact mode), it is not on the CPU or the ops cannot be
        built here."""
        from tokenloom.models.layers import Attention, DecoderLayer, GatedMLP, RotaryEmbedding

        decoder = getattr(model, "model", None)
        if decoder is None or type(getattr(decoder, "rotary_emb", None)) is not RotaryEmbedding:
            return None
        if not _plain_norm(decoder.norm):
            return None
        layers = []
        for index, layer in enumerate(decoder.layers):
            attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            if type(layer) is not DecoderLayer or type(attn) is not Attention or type(mlp) is not GatedMLP:
                return None
            if attn.q_norm is not None or attn.sliding_window is not None or mlp.act is not F.silu:
                return None
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if not all(_plain_linear(linear) for linear in linears):
                return None
            if any(next(linear.buffers()).device.type != "cpu" for linear in linears):
                return None
            if not (_plain_norm(layer.input_layernorm) and _plain_norm(layer.post_attention_layernorm)):
                return None
            layers.append(_Layer(layer.input_layernorm, layer.post_attention_layernorm, *linears, index))
        if not layers:
            return None
        # one choice of kernel or dense copy per projection serves every layer of a step
        for position in ("qkv", "o", "gate_up", "down"):
            if len({(getattr(x, position).max_kernel_rows, getattr(x, position).keeps_dense) for x in layers}) > 1:
                return None
        attn = decoder.layers[0].self_attn
        if attn.head_dim % 2 or attn.num_heads % attn.num_kv_heads or attn.head_dim > cpu_decode.MAX_HEAD_DIM:
            return None
        ops = cpu_decode.ops()
        return cls(model, layers, ops) if ops is not None else None

    def _project(self, linear: QuantizedLinear, x: torch.Tensor, kernel: bool) -> torch.Tensor:
        if kernel:
            y = linear.kernel(x)
            return y if y.is_contiguous() else y.contiguous()
        return F.linear(x, linear.dense_copy())

    def run(self, meta: DecodeMetadata, kv_cache: KVCache) -> torch.Tensor:
        """Hidden states [rows, hidden] after the final norm, for a decode-only step."""
        ops, model = self.ops, self.model
        rows, hidden_size = meta.input_ids.shape[0], self.hidden_size
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        hidden = model.model.embed_tokens(meta.input_ids).float().contiguous()
        cos, sin = model.model.rotary_emb(meta.positions, torch.float32, meta)
        cos, sin = cos.contiguous(), sin.contiguous()
        slots = meta.slot_mapping.contiguous()
        seq_lens = meta.seq_lens.contiguous()
        table = meta.block_table
        if table.stride(1) != 1:
            table = table.contiguous()
        use_c_attention = rows > 1 or int(seq_lens[0]) <= C_ATTENTION_MAX_KEYS
        first = self.layers[0]
        # whether each projection takes the kernel (bfloat16 in and out) or the dense copy (float32)
        kernel = [rows <= linear.max_kernel_rows or not linear.keeps_dense
                  for linear in (first.qkv, first.o, first.gate_up, first.down)]
        dtypes = [torch.bfloat16 if k else torch.float32 for k in kernel]
        codes = [BFLOAT16 if k else FLOAT32 for k in kernel]  # a projection's input and output dtype
        normed = torch.empty(rows, hidden_size, dtype=dtypes[0])
        normed2 = torch.empty(rows, hidden_size, dtype=dtypes[2])
        query = torch.empty(rows, heads, head_dim)
        attended = torch.empty(rows, heads * head_dim, dtype=dtypes[1])
        act = torch.empty(rows, self.intermediate, dtype=dtypes[3])
        h_ptr, q_ptr, a_ptr = hidden.data_ptr(), query.data_ptr(), attended.data_ptr()
        ops.add_rmsnorm(h_ptr, None, 0, first.ln1.weight.data_ptr(), first.ln1.eps, rows, hidden_size, normed.data_ptr(), codes[0])
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = kv_cache.keys[layer.index], kv_cache.values[layer.index]
            qkv = self._project(layer.qkv, normed, kernel[0])
            ops.rope_write(qkv.data_ptr(), codes[0], rows, heads, kv_heads, head_dim,
                           cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                           slots.data_ptr(), q_ptr)
            if use_c_attention:
                if ops.attend(q_ptr, k_cache.data_ptr(), v_cache.data_ptr(), table.data_ptr(), table.stride(0),
                              seq_lens.data_ptr(), kv_cache.block_size, rows, heads, kv_heads, head_dim,
                              self.scale, a_ptr, codes[1]) != 0:
                    raise MemoryError("out of memory for the attention scores of a decode step")
            else:
                group = meta.groups_for(None)[0]
                out = _attend(query, kv_cache, layer.index, group, self.scale, kv_heads != heads)
                attended.copy_(out.reshape(rows, heads * head_dim))
            o = self._project(layer.o, attended, kernel[1])
            ops.add_rmsnorm(h_ptr, o.data_ptr(), codes[1], layer.ln2.weight.data_ptr(),
                            layer.ln2.eps, rows, hidden_size, normed2.data_ptr(), codes[2])
            gate_up = self._project(layer.gate_up, normed2, kernel[2])
            ops.silu_mul(gate_up.data_ptr(), codes[2], rows, self.intermediate,
                         act.data_ptr(), codes[3])
            down = self._project(layer.down, act, kernel[3])
            nxt = self.layers[i + 1] if i < last else None
            ops.add_rmsnorm(h_ptr, down.data_ptr(), codes[3],
                            nxt.ln1.weight.data_ptr() if nxt else None, nxt.ln1.eps if nxt else 0.0, rows, hidden_size,
                            normed.data_ptr() if nxt else None, codes[0])
        return model.model.norm(hidden)
