"""Speculative decoding beside the scheduler (L5): which requests speculate, their proposals before each
step (prompt lookup in pure Python, or the draft model), and the acceptance counts.

A request speculates when its setting (`SamplingParams.speculative`, else `EngineConfig.speculative`)
is on, it is decoding (one uncomputed token), it asks for no per-token extras (logprobs, scores,
logits) and has no structured-output grammar (whose mask at a proposed position would need the
grammar advanced over the proposals before it): those rows decode one token per step as before."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tokenloom.engine.prompt_lookup import prompt_lookup
from tokenloom.engine.scheduler import SchedulerOutput
from tokenloom.engine.sequence import Sequence
from tokenloom.sampling_params import SamplingParams
from tokenloom.speculative_config import SpeculativeConfig, effective_speculative

if TYPE_CHECKING:
    import torch

    from tokenloom.detokenizer import IncrementalDetokenizer
    from tokenloom.engine.draft_model import DraftModelProposer
    from tokenloom.models.base import CausalLM


@dataclass
class SpeculativeStats:
    """Counts over the engine's life. A verified row is one speculating sequence in one step."""

    num_verified_rows: int = 0
    num_proposed_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / proposed tokens."""
        return self.num_accepted_tokens / self.num_proposed_tokens if self.num_proposed_tokens else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens a verified row emits on average: its accepted proposals plus the target's own one."""
        return (self.num_accepted_tokens + self.num_verified_rows) / self.num_verified_rows if self.num_verified_rows else None

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "num_verified_rows": self.num_verified_rows,
            "num_proposed_tokens": self.num_proposed_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
        }


class Speculator:
    def __init__(self, default: SpeculativeConfig | None, draft: DraftModelProposer | None = None) -> None:
        self.default = default
        self.draft = draft
        self.stats = SpeculativeStats()
        self.draft_probs: dict[str, torch.Tensor] = {}  # for the next runner step

    def setting(self, params: SamplingParams) -> SpeculativeConfig | None:
        return effective_speculative(params.speculative, self.default)

    def check(self, params: SamplingParams) -> None:
        """A request's speculative setting must be usable by this engine."""
        setting = self.setting(params)
        if setting is not None and setting.uses_draft_model and self.draft is None:
            raise ValueError(
                "speculative method 'draft_model' needs a draft model: create the engine with "
                "Engine(model, config, draft_model=...) (generate(assistant_model=...) in the compat API)"
            )

    def propose(self, running: list[Sequence]) -> None:
        """Set spec_token_ids of every running sequence for the coming step ([] where none)."""
        self.draft_probs = {}
        drafting: list[tuple[Sequence, int]] = []
        for seq in running:
            seq.spec_token_ids = []
            setting = self.setting(seq.params)
            k = _room(seq, setting)
            if setting is None or k < 1:
                continue
            if setting.uses_draft_model:
                drafting.append((seq, k))
            else:
                seq.spec_token_ids = prompt_lookup(seq.token_ids, k, setting.prompt_lookup_min, setting.prompt_lookup_max)
        if drafting and self.draft is not None:
            proposals = self.draft.propose(drafting)
            for seq, _ in drafting:
                ids, q = proposals.get(seq.request_id, ([], None))
                seq.spec_token_ids = ids
                if q is not None and ids:
                    self.draft_probs[seq.request_id] = q

    def record(self, out: SchedulerOutput, sampled_token_ids: list) -> None:
        row = 0
        for item in out.scheduled:
            if not item.samples:
                continue
            if item.spec_token_ids:
                self.stats.num_verified_rows += 1
                self.stats.num_proposed_tokens += len(item.spec_token_ids)
                self.stats.num_accepted_tokens += len(sampled_token_ids[row]) - 1
            row += 1

    def set_draft_model(
        self, model: CausalLM | None, busy: bool, target_vocab_size: int, num_blocks: int, block_size: int,
        max_model_len: int,
    ) -> None:
        """See Engine.set_draft_model."""
        if (self.draft.model if self.draft is not None else None) is model:
            return
        if busy:
            raise RuntimeError("set_draft_model needs an idle engine: finish or abort the queued requests first")
        proposer = None
        if model is not None:
            from tokenloom.engine.draft_model import DraftModelProposer

            proposer = DraftModelProposer(model, target_vocab_size, num_blocks, block_size, max_model_len)
        self.draft = proposer

    def register_seed(self, request_id: str, seed: int) -> None:
        if self.draft is not None:
            self.draft.register_seed(request_id, seed)

    def release(self, request_id: str) -> None:
        self.draft_probs.pop(request_id, None)
        if self.draft is not None:
            self.draft.release(request_id)


def _room(seq: Sequence, setting: SpeculativeConfig | None) -> int:
    """How many tokens may be proposed for `seq` now: its setting's count, within max_tokens (the last
    token of a run is the target's own) and the context length; 0 when it does not speculate."""
    params = seq.params
    if setting is None or seq.num_tokens - seq.num_computed_tokens != 1:
        return 0
    if params.logprobs is not None or params.output_scores or params.output_logits or seq.grammar is not None:
        return 0
    room = min(setting.num_speculative_tokens, params.max_tokens - seq.num_output_tokens - 1)
    if seq.max_total_tokens is not None:
        room = min(room, seq.max_total_tokens - seq.num_tokens - 1)
    return room


def push_until_stop(detok: IncrementalDetokenizer, seq: Sequence, new_ids: list[int]) -> tuple[str, list[int]]:
    """Detokenize a step's new tokens. Several (an accepted speculative run) go in one at a time when
    stop strings are set: the tokens after the one that completes a stop string are dropped from the
    sequence, as if it had stopped there. Returns the text delta and the tokens kept."""
    if len(new_ids) == 1 or not detok.stop:
        return detok.push_many(new_ids), new_ids
    delta = ""
    for index, token in enumerate(new_ids):
        delta += detok.push_many([token])
        if detok.stop_match is not None:
            drop = len(new_ids) - index - 1
            if drop:
                del seq.token_ids[-drop:]
                seq.num_computed_tokens = min(seq.num_computed_tokens, seq.num_tokens - 1)
            return delta, new_ids[: index + 1]
    return delta, new_ids
