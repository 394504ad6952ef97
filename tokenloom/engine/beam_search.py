"""Beam search as a driver beside the scheduler (L5), equal to transformers' `_beam_search`.

The selection is transformers' own, step by step (`transformers/generation/utils.py`): log-softmax
of the raw logits, the logits processors on those log-probabilities, plus the running beam scores,
the top `max(2, 1 + num_eos) * num_beams` candidates over `num_beams * vocab`, candidates that hit
EOS or the length limit become finished hypotheses when they rank among the first `num_beams`,
scored `sum_logprobs / generated_len ** length_penalty` (the EOS token counted), and the early
stopping heuristic decides when a prompt is done.

The KV cache is the engine's: each beam is a `Sequence` whose block table is forked from the beam
it continues, so beams share their common prefix block by block; a block about to be written while
shared is copied first (copy-on-write). Blocks are borrowed from the pool and all returned.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from tokenloom.engine.scheduler import ScheduledSequence, SchedulerOutput
from tokenloom.engine.sequence import Sequence
from tokenloom.sampling.sampler import SamplingBatch, process_logits
from tokenloom.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenloom.engine.engine import Engine

_DEAD = -1.0e9  # transformers' "very large negative" score for beams that may not be chosen


@dataclass
class BeamSearchParams:
    """How one beam search decodes (transformers' names in brackets).

    num_beams [num_beams]: beams kept per prompt. length_penalty [length_penalty]: a finished
    hypothesis scores `sum_logprobs / generated_len ** length_penalty`. early_stopping
    [early_stopping]: True stops a prompt once num_beams hypotheses are finished; False stops when
    the best running beam, at its current length, cannot beat the worst finished one; "never"
    uses the best length that beam could still reach. num_return_sequences: hypotheses returned
    per prompt, best first. max_tokens [max_new_tokens], min_tokens [min_new_tokens],
    stop_token_ids [eos_token_id]. sampling_params: the logits processors to apply
    (repetition_penalty, no_repeat_ngram_size, bad_words_ids, ...); its temperature, top-k/top-p,
    token limits and stop ids are ignored (beam search is greedy, the limits are the fields above).
    """

    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    num_return_sequences: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    sampling_params: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        _check_int("num_beams", self.num_beams, ">= 1", lambda v: v >= 1)
        value = self.length_penalty
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"length_penalty must be a finite number, got {value!r}")
        self.length_penalty = float(value)
        if not any(self.early_stopping is v for v in (True, False)) and self.early_stopping != "never":
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        _check_int(
            "num_return_sequences", self.num_return_sequences, f"in [1, num_beams={self.num_beams}]",
            lambda v: 1 <= v <= self.num_beams,
        )
        _check_int("max_tokens", self.max_tokens, ">= 1", lambda v: v >= 1)
        _check_int(
            "min_tokens", self.min_tokens, f"in [0, max_tokens={self.max_tokens}]",
            lambda v: 0 <= v <= self.max_tokens,
        )
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id, "integers >= 0", lambda v: v >= 0)
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids))
        if not isinstance(self.sampling_params, SamplingParams):
            raise ValueError(
                f"sampling_params must be a SamplingParams, got {type(self.sampling_params).__name__}"
            )


def _check_int(name: str, value: object, allowed: str, ok: Callable[[int], bool]) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


@dataclass
class BeamHypothesis:
    """One finished beam: the generated token ids (the prompt excluded, a final stop id included),
    its score as transformers reports it in `sequences_scores` (length-penalized sum of
    log-probabilities), and why it ended ("eos" or "length")."""

    token_ids: list[int]
    score: float
    finish_reason: str


@dataclass
class _Prompt:
    """One prompt of a group while its beams run."""

    index: int  # position in the caller's list
    token_ids: list[int]
    max_new: int  # max_tokens, capped by the model's context length
    beams: list[Sequence] = field(default_factory=list)  # running beams, num_beams of them
    finished: list[list[int]] = field(default_factory=list)  # generated ids per finished slot


def beam_search(engine: Engine, prompts: list[list[int]], params: BeamSearchParams) -> list[list[BeamHypothesis]]:
    """Beam search over each prompt (token ids), several prompts batched through the engine's model
    and paged KV cache. Returns, per prompt, `params.num_return_sequences` hypotheses best first:
    the `sequences` / `sequences_scores` transformers' `generate(num_beams=..., do_sample=False)`
    gives for that prompt alone. Needs an idle engine (no queued requests); borrows KV blocks from
    its pool and returns them all."""
    if engine.has_unfinished():
        raise RuntimeError("beam_search needs an idle engine: finish or abort the queued requests first")
    checked = [engine.checked_ids(f"token ids of prompt {i}", p) for i, p in enumerate(prompts)]
    engine.checked_ids("stop_token_ids", params.stop_token_ids)
    engine.check_param_ids(params.sampling_params)
    states = []
    for i, ids in enumerate(checked):
        if not ids:
            raise ValueError(f"prompt {i} must contain at least one token")
        room = engine.max_model_len - len(ids)
        if room < 1:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens; the model's context length is {engine.max_model_len}, "
                "which leaves no room to generate"
            )
        states.append(_Prompt(i, ids, min(params.max_tokens, room)))
    results: list[list[BeamHypothesis]] = [[] for _ in states]
    with torch.inference_mode():
        for group in _groups(engine, states, params.num_beams):
            _BeamGroup(engine, group, params).run(results)
    return results


def _blocks_bound(num_prompt: int, max_new: int, num_beams: int, block_size: int) -> int:
    """Most blocks one prompt's beams can hold at once: the prompt's full blocks are shared by all
    beams for good; past them each beam holds at most its own blocks up to its last computed token."""
    shared = num_prompt // block_size
    per_beam = -(-(num_prompt + max_new - 1) // block_size) - shared
    return shared + num_beams * per_beam


def _groups(engine: Engine, states: list[_Prompt], num_beams: int) -> list[list[_Prompt]]:
    """Prompts run together while their worst-case blocks fit the pool and their beams fit
    max_num_seqs (a prompt alone always runs, or is rejected when it could run out of blocks)."""
    manager = engine.block_manager
    groups: list[list[_Prompt]] = []
    used = rows = 0
    for state in states:
        need = _blocks_bound(len(state.token_ids), state.max_new, num_beams, manager.block_size)
        if need > manager.num_free_blocks:
            capacity = manager.num_free_blocks * manager.block_size
            raise ValueError(
                f"prompt {state.index} ({len(state.token_ids)} tokens) with num_beams={num_beams} and "
                f"{state.max_new} new tokens may need {need} KV blocks, the pool has {manager.num_free_blocks} "
                f"({capacity} tokens); raise EngineConfig.num_kv_blocks or kv_cache_memory_bytes"
            )
        if groups and used + need <= manager.num_free_blocks and rows + num_beams <= engine.config.max_num_seqs:
            groups[-1].append(state)
            used, rows = used + need, rows + num_beams
        else:
            groups.append([state])
            used, rows = need, num_beams
    return groups


class _BeamGroup:
    """Prompts whose beams advance together, one model forward per step. Tensors hold one row per
    prompt still running; rows are dropped as prompts finish."""

    def __init__(self, engine: Engine, prompts: list[_Prompt], params: BeamSearchParams) -> None:
        self.engine = engine
        self.manager = engine.block_manager
        self.params = params
        self.prompts = prompts
        self.num_beams = params.num_beams
        self.beams_to_keep = max(2, 1 + len(params.stop_token_ids)) * params.num_beams
        # Only temperature 0 keeps the sampler's processors free of temperature/top-k/top-p.
        self.sampling = dataclasses.replace(
            params.sampling_params, temperature=0.0, top_k=0, top_p=1.0, max_tokens=params.max_tokens,
            min_tokens=params.min_tokens, stop_token_ids=list(params.stop_token_ids), ignore_eos=False,
        )
        self._names = itertools.count()
        self._live: dict[int, Sequence] = {}  # sequences holding blocks, freed at the end whatever happens

    def _new_sequence(self, prompt: _Prompt, token_ids: list[int]) -> Sequence:
        seq = Sequence(f"beam-{prompt.index}-{next(self._names)}", prompt.token_ids, self.sampling, -1, token_ids)
        self._live[id(seq)] = seq
        return seq

    def _free(self, seq: Sequence) -> None:
        if self._live.pop(id(seq), None) is not None:
            self.manager.free(seq)

    def run(self, results: list[list[BeamHypothesis]]) -> None:
        try:
            self._run(results)
        finally:
            for seq in list(self._live.values()):
                self._free(seq)

    def _run(self, results: list[list[BeamHypothesis]]) -> None:
        device = self.engine.device
        nb = self.num_beams
        active = list(self.prompts)
        logits = self._prefill(active).repeat_interleave(nb, dim=0)  # every beam starts as the prompt
        # transformers' state, one row per active prompt
        running_scores = torch.zeros((len(active), nb), dtype=torch.float, device=device)
        running_scores[:, 1:] = _DEAD  # only beam 0 may extend at the first step
        finished_scores = torch.full((len(active), nb), _DEAD, dtype=torch.float, device=device)
        is_finished = torch.zeros((len(active), nb), dtype=torch.bool, device=device)
        improvable = torch.ones((len(active), 1), dtype=torch.bool, device=device)
        top_mask = torch.arange(self.beams_to_keep, device=device) < nb
        eos = torch.tensor(self.params.stop_token_ids, dtype=torch.long, device=device)
        lp, early = self.params.length_penalty, self.params.early_stopping
        step = 0  # tokens generated so far by every running beam
        while active:
            rows = len(active)
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            log_probs = self._process(log_probs, active)  # [rows * nb, vocab]
            vocab = log_probs.shape[-1]
            log_probs = log_probs.view(rows, nb, vocab) + running_scores[:, :, None]
            log_probs = log_probs.reshape(rows, nb * vocab)
            topk_scores, topk_indices = torch.topk(log_probs, k=self.beams_to_keep)  # [rows, keep]
            parents = (topk_indices // vocab).tolist()
            tokens = topk_indices % vocab
            max_new = torch.tensor([p.max_new for p in active], device=device)
            hits = torch.isin(tokens, eos) | (step + 1 >= max_new)[:, None]  # stop id or length limit
            tokens = tokens.tolist()

            # the running beams of the next step: the best candidates that did not stop
            running_all = topk_scores + hits.to(torch.float32) * _DEAD
            next_indices = torch.topk(running_all, k=nb)[1]
            running_scores = running_all.gather(1, next_indices)

            # finished hypotheses: the stopped candidates among the first num_beams compete with the
            # hypotheses kept so far (the same operations as transformers, for the same rounding)
            just_finished = hits & top_mask[None, :]
            candidate = topk_scores / ((step + 1) ** lp)
            full = torch.all(is_finished, dim=-1, keepdim=True) & (early is True)
            candidate += full.to(torch.float32) * _DEAD
            candidate += (~improvable).to(torch.float32) * _DEAD
            candidate += (~just_finished) * _DEAD
            merged = torch.cat((finished_scores, candidate), dim=1)
            chosen = torch.topk(merged, k=nb)[1]
            finished_scores = merged.gather(1, chosen)
            is_finished = torch.cat((is_finished, just_finished), dim=1).gather(1, chosen)
            for row, prompt in enumerate(active):
                prompt.finished = [
                    prompt.finished[j] if j < nb
                    else self._generated(prompt, parents[row][j - nb]) + [tokens[row][j - nb]]
                    for j in chosen[row].tolist()
                ]

            step += 1
            for row, prompt in enumerate(active):
                best_len = prompt.max_new if early == "never" and lp > 0.0 else step
                best_possible = running_scores[row, :1] / (best_len**lp)
                worst = torch.where(is_finished[row], torch.min(finished_scores[row]), _DEAD)
                improvable[row] &= torch.any(best_possible > worst)
            exists_open = ~(torch.all(is_finished, dim=-1) & (early is True))
            can_continue = ~torch.all(hits, dim=-1)
            keep = (improvable[:, 0] & exists_open & can_continue).tolist()

            next_list = next_indices.tolist()
            children: list[Sequence] = []
            old_beams: dict[int, Sequence] = {}
            for row, prompt in enumerate(active):
                old_beams.update((id(s), s) for s in prompt.beams)
                if not keep[row]:
                    results[prompt.index] = self._hypotheses(prompt, finished_scores[row])
                    prompt.beams = []
                    continue
                beams = []
                for j in next_list[row]:
                    parent = prompt.beams[parents[row][j]]
                    child = self._new_sequence(prompt, parent.token_ids + [tokens[row][j]])
                    self.manager.fork(parent, child)
                    child.num_computed_tokens = parent.num_computed_tokens
                    beams.append(child)
                prompt.beams = beams
                children.extend(beams)
            # Children hold references now, so freeing their parents returns only dropped branches.
            for seq in old_beams.values():
                self._free(seq)
            if not children:
                break
            keep_rows = torch.tensor(keep, dtype=torch.bool, device=device)
            active = [p for p, k in zip(active, keep) if k]
            running_scores = running_scores[keep_rows]
            finished_scores = finished_scores[keep_rows]
            is_finished = is_finished[keep_rows]
            improvable = improvable[keep_rows]
            logits = self._decode(children)

    @staticmethod
    def _generated(prompt: _Prompt, beam: int) -> list[int]:
        return prompt.beams[beam].token_ids[len(prompt.token_ids) :]

    def _hypotheses(self, prompt: _Prompt, scores: torch.Tensor) -> list[BeamHypothesis]:
        stops = set(self.params.stop_token_ids)
        out = []
        for tokens, score in zip(prompt.finished, scores.tolist()):
            reason = "eos" if tokens and tokens[-1] in stops else "length"
            out.append(BeamHypothesis(tokens, score, reason))
        return out[: self.params.num_return_sequences]

    def _process(self, log_probs: torch.Tensor, active: list[_Prompt]) -> torch.Tensor:
        """The logits processors over the beam rows. transformers applies them to log-probabilities
        in beam search, so they get those here too (a repetition penalty multiplies a negative
        log-probability, for instance)."""
        beams = [beam for prompt in active for beam in prompt.beams]  # one per row, prompt by prompt
        batch = SamplingBatch.build(
            [self.sampling] * len(beams),
            [beam.token_ids for beam in beams],
            [beam.num_prompt_tokens for beam in beams],
            [None] * len(beams),
            log_probs.device,
            vocab_size=log_probs.shape[-1],
        )
        return process_logits(log_probs, batch)

    def _prefill(self, prompts: list[_Prompt]) -> torch.Tensor:
        """Compute each prompt once (its blocks are then shared by all its beams); returns the logits
        of each prompt's last position, [num_prompts, vocab]."""
        budget_limit = self.engine.config.max_num_batched_tokens
        last_logits = []
        pending = list(prompts)
        while pending:
            batch: list[ScheduledSequence] = []
            budget = budget_limit
            while pending and (not batch or len(pending[0].token_ids) <= budget):
                prompt = pending.pop(0)
                seq = self._new_sequence(prompt, list(prompt.token_ids))
                self.manager.allocate(seq, seq.num_tokens)
                batch.append(ScheduledSequence(seq, seq.num_tokens))
                budget -= seq.num_tokens
                prompt.beams = [seq] * self.num_beams
                prompt.finished = [[] for _ in range(self.num_beams)]
            hidden = self.engine.runner.forward_hidden(SchedulerOutput(scheduled=batch))  # [tokens, hidden]
            ends = torch.tensor(list(itertools.accumulate(s.num_new_tokens for s in batch)), device=hidden.device)
            last_logits.append(self.engine.model.compute_logits(hidden[ends - 1]))
            for item in batch:
                item.seq.num_computed_tokens = item.seq.num_tokens
            self._free_behind_window([item.seq for item in batch])
        return torch.cat(last_logits)

    def _free_behind_window(self, seqs: list[Sequence]) -> None:
        """With a sliding window on every layer, blocks behind each beam's window go back to the pool
        (as the scheduler does): a shared block returns once no beam's window reaches it."""
        window = self.engine.model.config.kv_window
        if window is not None:
            for seq in seqs:
                # The next query sits at num_computed_tokens and reaches back window - 1 positions.
                self.manager.free_blocks_before(seq, seq.num_computed_tokens - window + 1)

    def _decode(self, beams: list[Sequence]) -> torch.Tensor:
        """One token per beam: give each beam a private copy of the block its new token lands in when
        that block is shared, a new block when it starts one, then run the model; [beams, vocab]."""
        sources: list[int] = []
        targets: list[int] = []
        for seq in beams:
            for source, target in self.manager.copy_on_write(seq, 1):
                sources.append(source)
                targets.append(target)
            self.manager.allocate(seq, 1)
        self.engine.kv_cache.copy_blocks(sources, targets)
        hidden = self.engine.runner.forward_hidden(SchedulerOutput([ScheduledSequence(s, 1) for s in beams]))
        for seq in beams:
            seq.num_computed_tokens += 1
        self._free_behind_window(beams)
        return self.engine.model.compute_logits(hidden)
