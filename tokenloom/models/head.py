"""The output projection of the default (quantized) mode (L2): float32 logits where decoding reads
them, for the cost of a quantized kernel.

The dense float32 head is the largest single read of a decode step (SmolLM2: 49,152 x 576 weights,
113 MB, ~5 ms of a ~25 ms step; Gemma 3's 262,144-token vocabulary reads six times that), but the
quantized kernels return bfloat16, and logits rounded to bfloat16 flip greedy choices between
near-tied tokens. `ShortlistHead` takes both, for calls of up to `max_kernel_rows` rows (decode
steps, the last position of short prefills):

1. approximate logits for the whole vocabulary from the head's stored GGUF blocks on the int4 kernel
   (Q8_0 as two 4-bit pieces: the stored weights up to bfloat16 scales; bfloat16 inputs and outputs);
2. each row's `shortlist` (K, 32 by default) largest approximate logits: the candidates;
3. those K logits recomputed in float32 from the exact dense weight rows, x @ W[candidates].T (a
   gather of K rows per input row), and written over the approximate ones.

So everything that looks at the top of the distribution (greedy argmax, top-k, top-p, beam scores,
logprobs of the likely tokens) reads float32 logits equal to the dense head's up to float32 summation
order (~1e-6), and only the tail keeps the kernel's precision (its bfloat16 inputs, scales and
outputs: up to 0.3 on SmolLM2's logits, 1.3% of a row's largest, see tests/test_shortlist_head.py).
A token left out of the shortlist has an approximate logit at most the K-th largest, so its exact
logit is at most that plus the kernel's error: a row whose best exact logit is not above the K-th
approximate one by a margin (2**-5 of its largest |logit|, 2.4x the worst error measured; SmolLM2's
rows clear it by 7% or more) could be missing its argmax, and is recomputed in full (ties at the top
wider than the shortlist, say). Wider calls (prefill over many positions, wide decode batches) run
the dense float32 weight as `Linear` does, so their logits are unchanged.

The exact weight is the dense Parameter the head had (tied: the embedding's), so `weight`,
`state_dict()`, export and the compat names see a plain `Linear`. The kernel is built on the first
call that uses it (packing SmolLM2's head costs ~0.13 s, a quarter of the whole load, paid once by
the first request instead)
and held as a child module whose buffers are not persistent: memory grows by the packed codes
(~35 MB for SmolLM2), state_dict() does not. It stands for the weight as loaded: once the Parameter is
replaced or written in place (load_state_dict), every call runs the dense weight.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.models.linear import Linear, QuantizedLinear

__all__ = ["ShortlistHead", "exact_heads", "top_k"]

_BUILD_LOCK = threading.Lock()  # kernels built on first use: one builder at a time


def _version(tensor: torch.Tensor) -> int:
    """The in-place write counter (inference tensors have none: -1)."""
    return -1 if tensor.is_inference() else tensor._version


class ShortlistHead(Linear):
    """y = x W^T with W the dense `weight` [out_features, in_features]: exact for calls of more than
    `max_kernel_rows` rows; for fewer, the quantized kernel's logits with each row's `shortlist`
    largest recomputed from `weight` (see the module docstring)."""

    SHORTLIST = 32
    # A row is recomputed in full when its best exact logit is not MARGIN above the K-th approximate
    # logit, MARGIN relative to the row's largest |logit| (the kernel's error grows with the logits).
    MARGIN = 2.0**-5

    def __init__(
        self,
        weight: nn.Parameter,
        kernel_source: Callable[[torch.device], QuantizedLinear],
        *,
        max_kernel_rows: int = 16,
        shortlist: int = SHORTLIST,
    ) -> None:
        nn.Module.__init__(self)  # Linear's attributes, without its empty weight
        if shortlist < 1:
            raise ValueError(f"shortlist must be >= 1, got {shortlist}")
        self.out_features, self.in_features = weight.shape
        self.output_sizes = [self.out_features]
        self.weight = weight
        self.bias = None
        self.max_kernel_rows = max_kernel_rows
        self.shortlist = shortlist
        self.exact_only = False  # exact_heads(): every call dense, nothing built
        self.register_module("approximate", None)  # the kernel, once built
        self._source: Callable[[torch.device], QuantizedLinear] | None = kernel_source
        self._loaded = (weakref.ref(weight), _version(weight))  # the weight the kernel stands for

    def _weight_as_loaded(self) -> bool:
        ref, version = self._loaded
        return ref() is self.weight and _version(self.weight) == version

    def approximate_kernel(self) -> QuantizedLinear | None:
        """The quantized kernel (built now on its first use), or None once the weight has changed."""
        kernel = self.approximate
        if kernel is not None and self._weight_as_loaded():
            return kernel
        with _BUILD_LOCK:
            if not self._weight_as_loaded():  # the kernel would answer for other weights: drop it
                self.approximate, self._source = None, None
            elif self.approximate is None and self._source is not None:
                kernel = self._source(self.weight.device)
                for name in kernel._buffers:  # not part of state_dict(): the weight is
                    kernel._non_persistent_buffers_set.add(name)
                self.approximate, self._source = kernel, None
            return self.approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] > self.max_kernel_rows or self.shortlist >= self.out_features or self.exact_only:
            return F.linear(x, self.weight)
        kernel = self.approximate_kernel()
        if kernel is None:
            return F.linear(x, self.weight)
        logits = self.refine(rows, kernel(rows))
        return logits.view(*x.shape[:-1], self.out_features)

    def refine(self, rows: torch.Tensor, approximate: torch.Tensor) -> torch.Tensor:
        """`approximate` [n, out_features] (overwritten) with each row's `shortlist` largest entries
        recomputed exactly from `rows` [n, in_features]; rows whose shortlist may miss the exact
        argmax are recomputed in full. Each row's result is independent of the others in the call
        (a multiply and a sum rather than bmm, one row at a time in the full recompute), so a row gives
        the same logits alone as in a batch, e.g. in a speculative verify step."""
        n = rows.shape[0]
        values, top = top_k(approximate, self.shortlist)  # [n, K]
        gathered = self.weight.index_select(0, top.reshape(-1)).view(n, self.shortlist, self.in_features)
        exact = (gathered * rows.to(self.weight.dtype)[:, None, :]).sum(dim=-1)  # [n, K]
        logits = approximate.scatter_(1, top, exact.to(approximate.dtype))
        best = exact.amax(dim=-1)
        margin = self.MARGIN * torch.maximum(best.abs(), values.abs().amax(dim=-1))
        unsure = best < values.amin(dim=-1) + margin
        if bool(unsure.any()):
            for row in unsure.nonzero().squeeze(-1).tolist():
                logits[row] = F.linear(rows[row : row + 1].to(self.weight.dtype), self.weight)[0].to(logits.dtype)
        return logits

    def extra_repr(self) -> str:
        built = "built" if self.approximate is not None else "on first use"
        return f"{super().extra_repr()}, shortlist={self.shortlist}, max_kernel_rows={self.max_kernel_rows}, kernel={built}"


_TOP_BLOCK = 128  # columns per block of top_k's first pass


def top_k(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [n, k] of the k largest of each row of `values` [n, m], in no order; equal
    values may be chosen either way. With m a multiple of 128 (and at least 128 k), in two passes:
    the k blocks of 128 columns with the largest maxima hold the k largest values (a value outside
    them has k larger block maxima above it), so the second pass looks at k * 128 columns. ~2-3x
    faster than one topk over SmolLM2's 49,152 columns."""
    n, m = values.shape
    if m % _TOP_BLOCK or m < _TOP_BLOCK * k or not values.is_contiguous():
        return values.topk(k, dim=-1, sorted=False)
    blocks = values.view(n, m // _TOP_BLOCK, _TOP_BLOCK).amax(dim=-1).topk(k, dim=-1, sorted=False).indices
    offsets = torch.arange(_TOP_BLOCK, device=values.device)
    columns = (blocks.unsqueeze(-1) * _TOP_BLOCK + offsets).view(n, k * _TOP_BLOCK)
    best, where = values.gather(1, columns).topk(k, dim=-1, sorted=False)
    return best, columns.gather(1, where)


@contextmanager
def exact_heads(model: nn.Module) -> Iterator[None]:
    """Within, the model's shortlist heads compute every call with the dense weight and build no
    kernel (the load check's forward pass: its three rows would build it during the load)."""
    heads = [m for m in model.modules() if isinstance(m, ShortlistHead)]
    before = [head.exact_only for head in heads]
    for head in heads:
        head.exact_only = True
    try:
        yield
    finally:
        for head, value in zip(heads, before):
            head.exact_only = value
