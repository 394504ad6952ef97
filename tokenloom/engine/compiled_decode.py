"""The compiled decode step the model runner holds (L4): torch.compile over the model's forward and
LM head for decode-only steps, as gpt-fast and nano-vllm do it, with the attention metadata as
tensors of fixed shape (`DecodeMetadata`).

Rows are padded to a batch-size bucket, so a handful of shapes serves every batch size; padding
rows write to the cache's scratch slot. On the CPU inductor's C++ backend compiles the step with the
block-table width dynamic (whatever the context length); after the first two buckets dynamo's
automatic dynamic shapes make the batch dimension dynamic too, so two compilations serve all. On CUDA the step is
compiled with mode="reduce-overhead" (CUDA graphs), the width rounded up to a power of two so that
few graphs are recorded. If a compilation fails (a model whose forward reads per-step Python lists,
say) no bucket is tried again: every decode step runs eagerly.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from tokenloom.attention.decode import DecodeMetadata
from tokenloom.cache.kv_cache import KVCache
from tokenloom.models.base import CausalLM

logger = logging.getLogger(__name__)

_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def batch_buckets(max_rows: int) -> list[int]:
    """The bucket sizes up to max_rows (which is always one of them)."""
    return [b for b in _BUCKETS if b < max_rows] + [max_rows]


def can_compile(device: torch.device) -> bool:
    """Whether torch.compile can run here: inductor needs a C++ compiler on the CPU."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    try:
        from torch._inductor import cpp_builder

        return bool(cpp_builder.get_cpp_compiler())
    except Exception:  # no compiler, or an inductor without this helper
        return False


def compile_blocker(model: torch.nn.Module, device: torch.device) -> str | None:
    """Why the decode step is not compiled for this model here, or None when it can be."""
    if device.type == "cpu":
        from tokenloom.models.head import ShortlistHead
        from tokenloom.models.linear import GGUFEmbedding, QuantizedLinear

        if any(isinstance(m, (QuantizedLinear, GGUFEmbedding, ShortlistHead)) for m in model.modules()):
            # measured on SmolLM2's int4 step (2 threads): with the pool size dynamic dynamo had not
            # finished its first graph after 12 minutes; with only the block-table width dynamic it
            # compiled in 70 s and stepped in 22.8 ms against eager's 20.5 ms; fully static shapes
            # gave 18.6 ms but recompile at every new width. Not a gain: eager is the path that runs.
            return "the CPU compile of quantized weights (int4 kernels, GGUF embeddings) is not supported"
    if not can_compile(device):
        return "torch.compile needs a C++ compiler on the CPU" if device.type == "cpu" else f"no compiler for {device}"
    return None


class CompiledDecode:
    """Decode-only steps through compiled graphs, one per batch-size bucket.

    `run` returns the logits [rows, vocab] of a step, compiling the bucket's graph on its first use.
    """

    def __init__(self, model: CausalLM, kv_cache: KVCache, device: torch.device, max_rows: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.buckets = batch_buckets(max_rows)
        self.is_cuda = device.type == "cuda"
        self._graphs: dict[int, Callable[..., torch.Tensor]] = {}
        self._failed: set[int] = set()
        self.compile_seconds: dict[int, float] = {}  # bucket -> time of its first (compiling) call
        # Dynamo keeps one cache for `_forward` across instances: with the pool size dynamic, engines
        # with pools of other sizes (and models of the same shapes) reuse the graphs instead of
        # recompiling until the recompile limit.
        for pool in (*kv_cache.keys, *kv_cache.values):
            torch._dynamo.mark_dynamic(pool, 0)

    def bucket_for(self, rows: int) -> int | None:
        """The smallest bucket holding `rows` rows, None when none does."""
        index = bisect.bisect_left(self.buckets, rows)
        return self.buckets[index] if index < len(self.buckets) else None

    def can_run(self, rows: int) -> bool:
        bucket = self.bucket_for(rows)
        return bucket is not None and bucket not in self._failed

    def _forward(self, packed: torch.Tensor) -> torch.Tensor:
        meta = DecodeMetadata.from_packed(packed, self.kv_cache.block_size)
        hidden = self.model(meta.input_ids, meta.positions, self.kv_cache, meta)  # [rows, hidden]
        return self.model.compute_logits(hidden)  # [rows, vocab]

    def _graph(self, bucket: int) -> Callable[..., torch.Tensor]:
        graph = self._graphs.get(bucket)
        if graph is None:
            options: dict[str, Any] = {"fullgraph": True}
            if self.is_cuda:
                options["mode"] = "reduce-overhead"
            graph = torch.compile(self._forward, **options)
            self._graphs[bucket] = graph
        return graph

    def run(self, input_ids: list[int], context_lens: list[int], block_tables: list[list[int]]) -> torch.Tensor | None:
        """Logits [len(input_ids), vocab] of a decode step (row i: token input_ids[i] ending a context
        of context_lens[i] tokens), or None when this batch size has no working graph (run it eagerly)."""
        rows = len(input_ids)
        bucket = self.bucket_for(rows)
        if bucket is None or bucket in self._failed:
            return None
        width = max(2, max(len(t) for t in block_tables))  # >= 2: a dynamic size must not be 0 or 1
        if self.is_cuda:
            width = 1 << (width - 1).bit_length()
        host = DecodeMetadata.pack(
            input_ids, context_lens, block_tables, self.kv_cache.block_size, bucket, width,
            self.kv_cache.scratch_slot,
        )
        packed = torch.from_numpy(host)
        if self.is_cuda:
            packed = packed.pin_memory().to(self.device, non_blocking=True)
        else:
            torch._dynamo.mark_dynamic(packed, 1)
        first = bucket not in self.compile_seconds
        start = time.perf_counter()
        try:
            logits = self._graph(bucket)(packed)
        except Exception as exc:  # a model this backend cannot compile: eager from now on
            if not first:
                raise
            logger.warning("compiled decode for %d rows failed (%s: %s); decode steps run eagerly from now on",
                           bucket, type(exc).__name__, exc)
            self._failed.update(self.buckets)  # the model, not the bucket, is what failed: never retrace
            return None
        if first:
            self.compile_seconds[bucket] = time.perf_counter() - start
            logger.info("compiled the decode step for %d rows in %.1f s", bucket, self.compile_seconds[bucket])
        return logits[:rows]
