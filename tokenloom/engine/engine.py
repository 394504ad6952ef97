"""The engine every face submits to: add_request / abort / step (L5)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from tokenloom.cache.block_manager import BlockManager
from tokenloom.cache.kv_cache import KVCache
from tokenloom.config import EngineConfig
from tokenloom.device import memory_bytes_available
from tokenloom.engine.model_runner import ModelRunner
from tokenloom.engine.scheduler import Scheduler, SchedulerOutput
from tokenloom.engine.sequence import Sequence
from tokenloom.models.base import CausalLM
from tokenloom.outputs import RequestOutput
from tokenloom.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenloom.detokenizer import IncrementalDetokenizer
    from tokenloom.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class Engine:
    """Owns the model, the KV cache, the scheduler and the runner. Not thread-safe: one thread
    (the caller's, or the server's engine loop) drives it."""

    def __init__(
        self,
        model: CausalLM,
        config: EngineConfig | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.model = model
        self.tokenizer = tokenizer
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype if param.is_floating_point() else torch.float32
        mc = model.config
        self.max_model_len = self.config.max_model_len or mc.max_position_embeddings
        block_size = self.config.block_size
        num_blocks = self.config.num_kv_blocks or self._blocks_for_budget(block_size)
        self.kv_cache = KVCache(
            mc.num_hidden_layers, num_blocks, block_size, mc.num_key_value_heads, mc.head_dim,
            self.dtype, self.device,
        )
        self.block_manager = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(
            self.block_manager, self.config.max_num_seqs, self.config.max_num_batched_tokens
        )
        self.runner = ModelRunner(model, self.kv_cache, self.device)
        self._sequences: dict[str, Sequence] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._texts: dict[str, str] = {}
        self._counter = itertools.count()

    def _blocks_for_budget(self, block_size: int) -> int:
        mc = self.model.config
        per_block = KVCache.bytes_per_block(
            mc.num_hidden_layers, block_size, mc.num_key_value_heads, mc.head_dim, self.dtype
        )
        budget = self.config.kv_cache_memory_bytes
        free = memory_bytes_available(self.device)
        if free is not None:
            budget = min(budget, int(free * 0.8))
        # Never more than the pool could use: max_num_seqs full-length sequences.
        most_useful = self.config.max_num_seqs * -(-self.max_model_len // block_size)
        return max(1, min(budget // per_block, most_useful))

    # ---- requests -------------------------------------------------------------------------
    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        detokenize: bool = True,
    ) -> str:
        """Queue a request; returns its id. Sampling requests without a seed get one drawn from
        torch's global generator, so `torch.manual_seed`/`set_seed` make runs repeatable."""
        index = next(self._counter)
        request_id = request_id if request_id is not None else f"req-{index}"
        if request_id in self._sequences:
            raise ValueError(f"request_id {request_id!r} is already in use")
        prompt = [int(t) for t in prompt_token_ids]
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {bad[:5]}")
        if len(prompt) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt)} tokens; the model's context length is {self.max_model_len}, "
                "which leaves no room to generate"
            )
        seq = Sequence(request_id, prompt, params, index, max_total_tokens=self.max_model_len)
        self.scheduler.add(seq)
        self._sequences[request_id] = seq
        if not params.is_greedy:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
            self.runner.register_seed(request_id, seed)
        if detokenize and self.tokenizer is not None:
            from tokenloom.detokenizer import IncrementalDetokenizer

            self._detokenizers[request_id] = IncrementalDetokenizer(
                self.tokenizer, prompt, skip_special_tokens=True
            )
        return request_id

    def abort(self, request_id: str) -> None:
        seq = self.scheduler.abort(request_id)
        if seq is not None:
            self._release(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_unfinished(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)

    # ---- stepping -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, and report every request that changed."""
        out: SchedulerOutput = self.scheduler.schedule()
        if out.is_empty:
            if self.scheduler.waiting:
                raise RuntimeError("the scheduler could not place any waiting request in the KV cache")
            return []
        result = self.runner.step(out)
        touched = self.scheduler.update(out, result.sampled_token_ids)
        outputs = []
        for seq in touched:
            outputs.append(self._output(seq, [seq.token_ids[-1]]))
            if seq.is_finished:
                self._release(seq)
        return outputs

    def run(self) -> Iterator[RequestOutput]:
        """Step until every queued request has finished, yielding each output."""
        while self.has_unfinished():
            yield from self.step()

    def _output(self, seq: Sequence, new_ids: list[int]) -> RequestOutput:
        detok = self._detokenizers.get(seq.request_id)
        delta = ""
        if detok is not None:
            delta = "".join(detok.push(t) for t in new_ids)
            if seq.is_finished:
                delta += detok.flush()
            self._texts[seq.request_id] = self._texts.get(seq.request_id, "") + delta
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            new_token_ids=new_ids,
            token_ids=seq.output_token_ids,
            text_delta=delta,
            text=self._texts.get(seq.request_id, ""),
            finished=seq.is_finished,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
        )

    def _release(self, seq: Sequence) -> None:
        self._sequences.pop(seq.request_id, None)
        self._detokenizers.pop(seq.request_id, None)
        self._texts.pop(seq.request_id, None)
        self.runner.release(seq.request_id)

    # ---- scoring --------------------------------------------------------------------------
    def prompt_logits(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Logits [len_i, vocab] for every position of each prompt, through the paged cache.
        Blocks are borrowed from the pool and returned; must not run while requests are queued."""
        if self.has_unfinished():
            raise RuntimeError("prompt_logits needs an idle engine")
        from tokenloom.engine.scheduler import ScheduledSequence

        results: list[torch.Tensor] = []
        pending = [Sequence(f"score-{i}", p, SamplingParams(), -1) for i, p in enumerate(prompts)]
        while pending:
            batch, budget = [], self.config.max_num_batched_tokens
            while pending and (not batch or pending[0].num_tokens <= budget):
                seq = pending[0]
                if not self.block_manager.can_allocate(seq, seq.num_tokens):
                    if not batch:
                        raise ValueError(f"a prompt of {seq.num_tokens} tokens does not fit the KV cache")
                    break
                pending.pop(0)
                self.block_manager.allocate(seq, seq.num_tokens)
                batch.append(ScheduledSequence(seq, seq.num_tokens))
                budget -= seq.num_tokens
            try:
                results.extend(self.runner.all_logits(SchedulerOutput(scheduled=batch)))
            finally:
                for item in batch:
                    self.block_manager.free(item.seq)
        return results
