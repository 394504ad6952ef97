"""SchedulerOutput -> tensors -> model -> sampler -> token ids (L4). The only place lists of
tokens become tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenloom.attention.paged import AttentionMetadata
from tokenloom.cache.kv_cache import KVCache
from tokenloom.engine.scheduler import SchedulerOutput
from tokenloom.models.base import CausalLM
from tokenloom.outputs import TokenLogprob
from tokenloom.sampling.sampler import SamplingBatch, process_logits, sample_processed, token_logprobs


@dataclass
class StepResult:
    """One entry per sampling sequence, in scheduled order. logprobs/scores/logits hold None for
    rows whose parameters did not ask for them (SamplingParams.logprobs / output_scores /
    output_logits); scores are the processed float32 row (after every processor and warper, as
    transformers' `scores`), logits the raw float32 row."""

    sampled_token_ids: list[int]
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    scores: list[torch.Tensor | None] = field(default_factory=list)  # processed, [vocab]
    logits: list[torch.Tensor | None] = field(default_factory=list)  # raw, [vocab]


class ModelRunner:
    def __init__(self, model: CausalLM, kv_cache: KVCache, device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self._generators: dict[str, torch.Generator] = {}

    @property
    def block_size(self) -> int:
        return self.kv_cache.block_size

    def register_seed(self, request_id: str, seed: int) -> None:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        self._generators[request_id] = generator

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    @torch.inference_mode()
    def forward_hidden(self, out: SchedulerOutput) -> torch.Tensor:
        """Run the model over the step's tokens; returns hidden states [num_tokens, hidden]."""
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        block_tables: list[list[int]] = []
        for item in out.scheduled:
            seq = item.seq
            start = seq.num_computed_tokens
            end = start + item.num_new_tokens
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            query_lens.append(item.num_new_tokens)
            context_lens.append(end)
            block_tables.append(seq.block_ids)
        meta = AttentionMetadata.build(query_lens, context_lens, block_tables, self.block_size, self.device)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        return self.model(ids, pos, self.kv_cache, meta)

    @torch.inference_mode()
    def step(self, out: SchedulerOutput) -> StepResult:
        hidden = self.forward_hidden(out)
        rows: list[int] = []
        offset = 0
        sampling = []
        for item in out.scheduled:
            offset += item.num_new_tokens
            if item.samples:
                rows.append(offset - 1)
                sampling.append(item.seq)
        if not rows:
            return StepResult([])
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])  # [rows, vocab]
        params = [s.params for s in sampling]
        batch = SamplingBatch.build(
            params,
            [s.token_ids for s in sampling],
            [s.num_prompt_tokens for s in sampling],
            [None if p.is_greedy else self._generators.get(s.request_id) for p, s in zip(params, sampling)],
            self.device,
            vocab_size=logits.shape[-1],
        )
        processed = process_logits(logits, batch)
        ids = sample_processed(processed, batch)
        none: list = [None] * len(sampling)
        result = StepResult(ids.tolist(), none, list(none), list(none))
        if any(p.logprobs is not None for p in params):
            result.logprobs = token_logprobs(logits, ids, [p.logprobs for p in params])
        for row, p in enumerate(params):
            # copies, so that a kept row does not hold the whole batch's tensor alive
            if p.output_scores:
                result.scores[row] = processed[row].clone()
            if p.output_logits:
                result.logits[row] = logits[row].float().clone()
        return result

    @torch.inference_mode()
    def all_logits(self, out: SchedulerOutput) -> list[torch.Tensor]:
        """Logits for every computed token, split per scheduled sequence ([len_i, vocab] each)."""
        hidden = self.forward_hidden(out)
        logits = self.model.compute_logits(hidden)
        return list(logits.split([s.num_new_tokens for s in out.scheduled]))
