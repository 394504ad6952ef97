"""The draft-model proposer (L4): a small model with the target's vocabulary proposes k tokens per
step through its own paged KV cache and runner (transformers' assistant_model, vLLM's draft model).

Each target request has a mirror sequence here. Before proposing, the mirror takes the target's
tokens; its computed count falls back to the longest prefix it shares with them, so the KV written for
proposals the target rejected is simply overwritten. Greedy requests get the draft's argmax; sampled
ones a draw from the draft's processed distribution q (same processors and warpers as the request),
which the verifier needs for rejection sampling."""

from __future__ import annotations

import torch

from tokenloom.cache.block_manager import BlockManager
from tokenloom.cache.kv_cache import KVCache
from tokenloom.engine.model_runner import ModelRunner
from tokenloom.engine.scheduler import ScheduledSequence, SchedulerOutput
from tokenloom.engine.sequence import Sequence
from tokenloom.models.base import CausalLM
from tokenloom.sampling.sampler import SamplingBatch, process_logits
from tokenloom.sampling.speculative import _draw
from tokenloom.sampling.state import wide_float

Proposal = tuple[list[int], torch.Tensor | None]  # proposed ids, and q [k, vocab] for a sampled request


class DraftModelProposer:
    def __init__(self, model: CausalLM, target_vocab_size: int, num_blocks: int, block_size: int, max_model_len: int) -> None:
        mc = model.config
        if mc.vocab_size != target_vocab_size:
            raise ValueError(
                f"the draft model's vocabulary has {mc.vocab_size} tokens and the target model's "
                f"{target_vocab_size}; a draft model must share the target's tokenizer and vocabulary"
            )
        self.model = model
        param = next(model.parameters())
        self.device = param.device
        dtype = param.dtype if param.is_floating_point() else torch.float32
        self.kv_cache = KVCache(
            mc.num_hidden_layers, num_blocks, block_size, mc.num_key_value_heads, mc.head_dim, dtype, self.device
        )
        self.block_manager = BlockManager(num_blocks, block_size)
        self.runner = ModelRunner(model, self.kv_cache, self.device)
        self.max_len = min(max_model_len, mc.max_position_embeddings)
        self._mirrors: dict[str, Sequence] = {}
        self._synced: dict[str, int] = {}  # target length at the last sync
        self._generators: dict[str, torch.Generator] = {}

    def register_seed(self, request_id: str, seed: int) -> None:
        generator = torch.Generator(device=self.device)
        generator.manual_seed((seed * 0x9E3779B1 + 1) % 2**63)  # a stream apart from the target's
        self._generators[request_id] = generator

    def release(self, request_id: str) -> None:
        mirror = self._mirrors.pop(request_id, None)
        if mirror is not None:
            self.block_manager.free(mirror)
        self._synced.pop(request_id, None)
        self._generators.pop(request_id, None)

    @torch.inference_mode()
    def propose(self, requests: list[tuple[Sequence, int]]) -> dict[str, Proposal]:
        """Up to k tokens for each (target sequence, k), all rows batched: one forward over each
        mirror's uncomputed tokens, then k - 1 one-token decode steps."""
        active: list[tuple[Sequence, int]] = []
        for seq, k in requests:
            mirror = self._sync(seq)
            k = min(k, self.max_len - mirror.num_tokens)
            if k >= 1 and self._reserve(mirror, mirror.num_tokens - mirror.num_computed_tokens + k - 1):
                active.append((mirror, k))
        proposals: dict[str, tuple[list[int], list[torch.Tensor]]] = {m.request_id: ([], []) for m, _ in active}
        for step in range(max((k for _, k in active), default=0)):
            rows = [m for m, k in active if k > step]
            if step == 0:
                out = SchedulerOutput([ScheduledSequence(m, m.num_tokens - m.num_computed_tokens) for m in rows])
                hidden = self.runner.forward_hidden(out)
                ends = torch.tensor([item.num_new_tokens for item in out.scheduled], device=self.device).cumsum(0)
                logits = self.model.compute_logits(hidden[ends - 1])  # [rows, vocab]
            else:
                out = SchedulerOutput([ScheduledSequence(m, 1) for m in rows])
                logits = self.runner.decode_logits(out)  # [rows, vocab]
            tokens = self._choose(logits, rows, proposals)
            for item, token in zip(out.scheduled, tokens):
                item.seq.num_computed_tokens += item.num_new_tokens
                item.seq.append_token(token)
        return {
            rid: (ids, torch.stack(qs) if qs else None) for rid, (ids, qs) in proposals.items()
        }

    def _choose(
        self, logits: torch.Tensor, rows: list[Sequence], proposals: dict[str, tuple[list[int], list[torch.Tensor]]]
    ) -> list[int]:
        tokens = logits.argmax(dim=-1).tolist()
        sampled = [i for i, m in enumerate(rows) if not m.params.is_greedy]
        if sampled:
            batch = SamplingBatch.build(
                [rows[i].params for i in sampled], [rows[i].token_ids for i in sampled],
                [rows[i].num_prompt_tokens for i in sampled], [None] * len(sampled), self.device,
                vocab_size=logits.shape[-1],
            )
            index = torch.tensor(sampled, device=self.device)
            q = process_logits(logits[index], batch).softmax(dim=-1).to(wide_float(self.device))  # [n, vocab]
            for j, i in enumerate(sampled):
                generator = self._generators.get(rows[i].request_id)
                uniform = torch.rand((), generator=generator, dtype=q.dtype, device=self.device)
                tokens[i] = _draw(q[j], uniform)
                proposals[rows[i].request_id][1].append(q[j])
        for m, token in zip(rows, tokens):
            proposals[m.request_id][0].append(token)
        return tokens

    def _sync(self, seq: Sequence) -> Sequence:
        """The mirror of `seq`, holding its tokens; computed only as far as both agree."""
        rid = seq.request_id
        mirror = self._mirrors.get(rid)
        target = seq.token_ids
        if mirror is None:
            mirror = self._mirrors[rid] = Sequence(rid, list(seq.prompt_token_ids), seq.params, seq.arrival_index)
            mirror.token_ids = list(target)
        else:
            common = min(self._synced[rid], len(target))
            while common < min(len(mirror.token_ids), len(target)) and mirror.token_ids[common] == target[common]:
                common += 1
            del mirror.token_ids[common:]
            mirror.token_ids.extend(target[common:])
            mirror.num_computed_tokens = min(mirror.num_computed_tokens, common)
        # the last token is always computed in the proposing step: its logits give the first proposal
        mirror.num_computed_tokens = min(mirror.num_computed_tokens, mirror.num_tokens - 1)
        self._synced[rid] = len(target)
        return mirror

    def _reserve(self, mirror: Sequence, num_tokens: int) -> bool:
        """Blocks for `num_tokens` more positions; a mirror that finds none starts over (its cache is
        recomputed later), and proposes nothing when even that does not fit."""
        if self.block_manager.can_allocate(mirror, num_tokens):
            self.block_manager.allocate(mirror, num_tokens)
            return True
        self.block_manager.free(mirror)
        mirror.num_computed_tokens = 0
        return False
