"""Scoring prompts through the engine's paged KV cache (L5): every position's logits."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tokenloom.engine.scheduler import ScheduledSequence, SchedulerOutput
from tokenloom.engine.sequence import Sequence
from tokenloom.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenloom.engine.engine import Engine


def prompt_logits(engine: Engine, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Logits [len_i, vocab] for every position of each prompt, through the paged cache.
    Blocks are borrowed from the pool and returned; must not run while requests are queued."""
    if engine.has_unfinished():
        raise RuntimeError("prompt_logits needs an idle engine")
    results: list[torch.Tensor] = []
    prompts = [engine.checked_ids(f"token ids of prompt {i}", p) for i, p in enumerate(prompts)]
    pending = [Sequence(f"score-{i}", p, SamplingParams(), -1) for i, p in enumerate(prompts)]
    while pending:
        batch, budget = [], engine.config.max_num_batched_tokens
        while pending and (not batch or pending[0].num_tokens <= budget):
            seq = pending[0]
            if not engine.block_manager.can_allocate(seq, seq.num_tokens):
                if not batch:
                    capacity = engine.block_manager.num_blocks * engine.block_manager.block_size
                    raise ValueError(
                        f"a prompt of {seq.num_tokens} tokens does not fit the KV cache of {capacity} "
                        "tokens; raise EngineConfig.num_kv_blocks or kv_cache_memory"
                    )
                break
            pending.pop(0)
            engine.block_manager.allocate(seq, seq.num_tokens)
            batch.append(ScheduledSequence(seq, seq.num_tokens))
            budget -= seq.num_tokens
        try:
            results.extend(engine.runner.all_logits(SchedulerOutput(scheduled=batch)))
        finally:
            for item in batch:
                engine.block_manager.free(item.seq)
    return results
