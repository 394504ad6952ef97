"""Weight formats of linear layers and embeddings (L2).

Model files build `Linear` and `Embedding` (dense, Hugging Face layout and numerics: the exact mode).
Loading may put a quantized format in their place, decided per weight by `tokenloom.loading.build`:

- `Int4Linear`: 4-bit codes in groups of 32 with a bfloat16 scale and zero per group, on the int4
  kernel; formats of more bits (Q5_*, Q8_0) are split into two 4-bit pieces whose products the kernel
  sums, so they stay exact to the kernel's scale precision.
- `Int8Linear`: int8 codes with one bfloat16 scale per output row, on the int8 kernel.
- `ConcatLinear`: a fused projection whose parts came in different formats.
- `GGUFEmbedding`: embedding rows kept as GGUF blocks, dequantized row by row at lookup.

A quantized linear chooses its kernel by the rows of the call (`KernelPolicy`): the quantized kernel
for few rows (decode steps), a dense copy of the same weights for wide calls when one is kept. The
branch is on `x.shape[0]` only, so the forward stays friendly to torch.compile.

Invariant the engine relies on: every nn.Parameter has the activation dtype; codes, scales and dense
copies are buffers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.kernels import int4, int8
from tokenloom.kernels.ggml import dequantize_rows
from tokenloom.kernels.policy import KernelPolicy
from tokenloom.models.row_floor import floored_linear

__all__ = [
    "ConcatLinear",
    "Embedding",
    "GGUFEmbedding",
    "Int4Linear",
    "Int8Linear",
    "KernelPolicy",
    "Linear",
    "QuantizedLinear",
]

_DENSE_LOCK = threading.Lock()  # dense copies built on first use: one builder at a time


class Linear(nn.Module):
    """Dense y = x W^T + b, as nn.Linear (weight [out_features, in_features]) but never initialised:
    loading fills it. `output_sizes` are the row blocks of a fused projection (q, k, v or gate, up)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, output_sizes: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.output_sizes = list(output_sizes or [out_features])
        if sum(self.output_sizes) != out_features:
            raise ValueError(f"output_sizes {self.output_sizes} do not add up to out_features={out_features}")
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return floored_linear(x, self.weight, self.bias)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.detach().float()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuantizedLinear(nn.Module):
    """What the quantized formats share: sizes, bias, the optional dense copy and the row dispatch."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        output_sizes: Sequence[int] | None,
        bias: torch.Tensor | None,
        policy: KernelPolicy,
        dense: torch.Tensor | Callable[[], torch.Tensor] | None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.output_sizes = list(output_sizes or [out_features])
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.max_kernel_rows = policy.max_kernel_rows
        # The dense copy for wide calls, [out_features, in_features]: a tensor, or a function that builds
        # it on the first wide call (from the still-mapped file), so loading does not pay for it and a
        # process that never prefills more than max_kernel_rows tokens never holds it.
        self.keeps_dense = dense is not None
        self._dense_source = dense if callable(dense) else None
        self._dense_dtype = policy.dense_dtype
        self.register_buffer("dense", None if callable(dense) else dense, persistent=False)

    # buffers whose dtype the kernel fixes: Module.half() / .to(dtype) move them, never cast them
    kernel_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        dtypes = {name: self._buffers[name].dtype for name in self.kernel_buffers}
        super()._apply(fn, recurse)
        for name, dtype in dtypes.items():
            buffer = self._buffers[name]
            if buffer is not None and buffer.dtype != dtype:
                self._buffers[name] = buffer.to(dtype)
        return self

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in_features] -> [rows, out_features] through the quantized kernel."""
        raise NotImplementedError

    def dense_copy(self) -> torch.Tensor | None:
        """The dense copy for wide calls (built now if it was left for its first use), or None."""
        if self.dense is None and self._dense_source is not None:
            with _DENSE_LOCK:
                if self.dense is None and self._dense_source is not None:
                    device = next(iter(self.buffers())).device  # where the kernel's buffers are now
                    dtype = self._dense_dtype or torch.float32
                    self.dense = self._dense_source().to(device=device, dtype=dtype)
                    self._dense_source = None
        return self.dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        if self.keeps_dense and rows.shape[0] > self.max_kernel_rows:
            dense = self.dense_copy()
            if dense.dtype == x.dtype:
                y = F.linear(rows, dense, self.bias)
                return y.view(*shape[:-1], self.out_features)
            y = F.linear(rows.to(dense.dtype), dense).to(x.dtype)
        else:
            y = self.kernel(rows).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """float32 [out_features, in_features]: the weights the quantized kernel computes with."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        dense = "none" if not self.keeps_dense else str(self._dense_dtype or torch.float32).replace("torch.", "")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"max_kernel_rows={self.max_kernel_rows}, dense_copy={dense}"
        )


class Int4Linear(QuantizedLinear):
    """4-bit codes q in groups of `group_size` input columns, w = (q - 8) * scale + zero. A weight of
    more bits is stored as `pieces` 4-bit pieces side by side along the input dimension (piece p holds
    bits 4p..4p+3 with its scale multiplied by 16**p); the input is repeated once per piece, so the
    kernel's float32 sums add the pieces up."""

    kernel_buffers = ("packed", "scale_and_zeros")

    def __init__(
        self,
        packed: torch.Tensor,
        scale_and_zeros: torch.Tensor,
        layout: int4.Int4Layout,
        *,
        in_features: int,
        pieces: int,
        output_sizes: Sequence[int] | None = None,
        bias: torch.Tensor | None = None,
        policy: KernelPolicy = KernelPolicy(),
        dense: torch.Tensor | Callable[[], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(in_features, layout.out_features, output_sizes, bias, policy, dense)
        self.register_buffer("packed", packed)
        self.register_buffer("scale_and_zeros", scale_and_zeros)  # bf16 [pieces * K' / group, N', 2]
        self.layout = layout
        self.group_size = layout.group_size
        self.pieces = pieces
        self.piece_in = layout.in_features // pieces  # each piece's input width, padded to the group
        self.pad_in = self.piece_in - in_features
        self.pad_out = layout.padded_out != layout.out_features

    @classmethod
    def from_affine(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        offsets: torch.Tensor,
        bits: int,
        group_size: int,
        device: torch.device,
        **options,
    ) -> Int4Linear:
        """w = code * scale + offset per group (codes uint8 [N, K] of `bits` bits, scales and offsets
        float32 [N, ceil(K / group_size)]) in ceil(bits / 4) pieces of the kernel's convention."""
        out_features, in_features = codes.shape
        piece_in = -(-in_features // group_size) * group_size
        if piece_in != in_features:  # the padded columns meet zero inputs: any code will do
            codes = F.pad(codes, (0, piece_in - in_features), value=8)
        pieces, shift, centre = piece_plan(bits)
        zeros = offsets + centre * scales  # all of the constant goes to piece 0
        if pieces == 1:  # 4-bit codes go in as they are
            packed, scale_and_zeros, layout = int4.pack_int4(codes, scales, zeros, group_size, device)
        else:
            # the pieces side by side, each written straight into its columns (one pass per piece)
            piece_codes = torch.empty(out_features, pieces * piece_in, dtype=codes.dtype, device=codes.device)
            piece_scales, piece_zeros = [], []
            for p in range(pieces):
                piece = piece_codes[:, p * piece_in : (p + 1) * piece_in]
                if p == 0:
                    torch.bitwise_and(codes, 0x0F, out=piece)
                else:
                    torch.bitwise_right_shift(codes, 4 * p, out=piece)
                    if p < pieces - 1:
                        piece.bitwise_and_(0x0F)
                    elif shift:
                        piece.add_(shift)
                piece_scales.append(scales * float(16**p))
                piece_zeros.append(zeros if p == 0 else torch.zeros_like(scales))
            packed, scale_and_zeros, layout = int4.pack_int4(
                piece_codes,
                torch.cat(piece_scales, dim=1),
                torch.cat(piece_zeros, dim=1),
                group_size,
                device,
            )
        return cls(packed, scale_and_zeros, layout, in_features=in_features, pieces=pieces, **options)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        if self.pad_in:
            x = F.pad(x, (0, self.pad_in))
        x = x.repeat(1, self.pieces) if self.pieces > 1 else x.contiguous()
        y = int4.int4_mm(x, self.packed, self.scale_and_zeros, self.group_size)
        return y[:, : self.out_features] if self.pad_out else y

    def dequantized_weight(self) -> torch.Tensor:
        weight = int4.dequantize_packed(self.packed, self.scale_and_zeros, self.layout)
        return weight.view(self.out_features, self.pieces, self.piece_in).sum(1)[:, : self.in_features]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, pieces={self.pieces}"


def piece_plan(bits: int) -> tuple[int, int, int]:
    """(pieces, shift, centre) for codes of `bits` bits: the top piece's codes are stored shifted by
    `shift` (they use fewer than 4 bits when bits % 4 != 0), and the kernel's "- 8" per piece plus the
    shift leave `centre` scales to add back. The shift is chosen so that centre - 2**(bits - 1) is as
    small as possible: a symmetric format's zero is then a few scales at most, so its bfloat16
    rounding stays as small as the scale's own."""
    pieces = -(-bits // 4)
    top_bits = bits - 4 * (pieces - 1)
    lower = 8 * sum(16**p for p in range(pieces - 1))

    def centre(shift: int) -> int:
        return lower + 16 ** (pieces - 1) * (8 - shift)

    shift = min(range(16 - 2**top_bits + 1), key=lambda k: abs(centre(k) - 2 ** (bits - 1)))
    return pieces, shift, centre(shift)


class Int8Linear(QuantizedLinear):
    """int8 codes [N, K] with one scale per output row: w = code * scale."""

    kernel_buffers = ("codes", "scales")

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        *,
        in_features: int,
        output_sizes: Sequence[int] | None = None,
        bias: torch.Tensor | None = None,
        policy: KernelPolicy = KernelPolicy(),
        dense: torch.Tensor | Callable[[], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(in_features, codes.shape[0], output_sizes, bias, policy, dense)
        self.register_buffer("codes", codes)  # int8 [N, K'] (K' = K padded for the kernel)
        self.register_buffer("scales", scales)  # bf16 [N]
        self.pad_in = codes.shape[1] - in_features

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, scales: torch.Tensor, device: torch.device, **options
    ) -> Int8Linear:
        packed, kernel_scales = int8.pack_int8(codes, scales, device)
        return cls(packed, kernel_scales, in_features=codes.shape[1], **options)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        x = F.pad(x, (0, self.pad_in)) if self.pad_in else x.contiguous()
        return int8.int8_mm(x, self.codes, self.scales)

    def dequantized_weight(self) -> torch.Tensor:
        return (self.codes.float() * self.scales.float()[:, None])[:, : self.in_features]


class ConcatLinear(nn.Module):
    """A fused projection whose row blocks are held by separate formats (a GGUF may store q and k in
    Q4_K and v in Q6_K); outputs are concatenated in order."""

    def __init__(self, parts: Sequence[nn.Module], output_sizes: Sequence[int]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(part.out_features for part in parts)
        self.output_sizes = list(output_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)

    def dequantized_weight(self) -> torch.Tensor:
        return torch.cat([part.dequantized_weight() for part in self.parts], dim=0)


class Embedding(nn.Module):
    """Dense embedding (nn.Embedding's numerics), never initialised: loading fills it."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.detach().float()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class GGUFEmbedding(nn.Module):
    """Embedding rows kept as stored GGUF blocks (uint8 [num_embeddings, row_bytes]); a lookup
    dequantizes only the rows it reads, exactly as `gguf.quants` does, then casts to `dtype`."""

    def __init__(self, rows: torch.Tensor, ggml_type: int, embedding_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("rows", rows)
        # an empty tensor of the output dtype, so that Module.half() / .to(dtype) change it too
        self.register_buffer("output_dtype", torch.empty(0, dtype=dtype, device=rows.device), persistent=False)
        self.ggml_type = int(ggml_type)
        self.num_embeddings, self.embedding_dim = rows.shape[0], embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        values = dequantize_rows(self.rows.index_select(0, flat), self.ggml_type, self.embedding_dim)
        return values.to(self.output_dtype.dtype).view(*ids.shape, self.embedding_dim)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_rows(self.rows, self.ggml_type, self.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        """The whole table dequantized, in the output dtype (a copy, as nn.Embedding's `weight` reads)."""
        return self.dequantized_weight().to(self.output_dtype.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, ggml_type={self.ggml_type}"


LINEAR_FORMATS = (Linear, QuantizedLinear, ConcatLinear)
EMBEDDING_FORMATS = (Embedding, GGUFEmbedding)
