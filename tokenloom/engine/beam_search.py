"""Beam search as a driver beside the scheduler (L5), equal to transformers' `_beam_search`.

The selection is transformers' own, step by step (`transformers/generation/utils.py`): log-softmax
of the raw logits, the logits processors on those log-probabilities, plus the running beam scores,
the top `max(2, 1 + num_eos) * num_beams` candidates over `num_beams * vocab`, candidates that hit
EOS or the length limit become finished hypotheses when they rank among the first `num_beams`,
scored `sum_logprobs / generated_len ** length_penalty` (the EOS token counted), and the early
stopping heuristic decides when a prompt is done. That tensor math is `tokenloom.sampling.beam`
(L1t), run by `ModelRunner.beam_step` (L4) with the model forward and the block copies; this module
keeps the Python side: which beam continues which, the blocks (fork, copy-on-write) and hypotheses.

The KV cache is the engine's: each beam is a `Sequence` whose block table is forked from the beam
it continues, so beams share their common prefix block by block; a block about to be written while
shared is copied first (copy-on-write). Blocks are borrowed from the pool and all returned.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from tokenloom.engine.scheduler import ScheduledSequence, SchedulerOutput
from tokenloom.engine.sequence import Sequence
from tokenloom.sampling.beam import BeamSettings, BeamState
from tokenloom.sampling_params import ParameterError, SamplingParams, check, check_int

if TYPE_CHECKING:
    import torch

    from tokenloom.engine.engine import Engine
    from tokenloom.engine.model_runner import BeamStepResult


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
    output_scores [output_scores] / output_logits [output_logits]: keep, per step, the processed
    log-probabilities / raw logits of every beam (BeamHypothesis.step_scores / step_logits).
    """

    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    num_return_sequences: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    output_scores: bool = False
    output_logits: bool = False

    def __post_init__(self) -> None:
        check("num_beams", self.num_beams)
        check("length_penalty", self.length_penalty)
        self.length_penalty = float(self.length_penalty)
        if not any(self.early_stopping is v for v in (True, False)) and self.early_stopping != "never":
            raise ParameterError("early_stopping", self.early_stopping, "True, False or 'never'")
        check_int(
            "num_return_sequences", self.num_return_sequences, f"in [1, num_beams={self.num_beams}]",
            lambda v: 1 <= v <= self.num_beams,
        )
        check("max_tokens", self.max_tokens)
        check_int(
            "min_tokens", self.min_tokens, f"in [0, max_tokens={self.max_tokens}]",
            lambda v: 0 <= v <= self.max_tokens,
        )
        for token_id in self.stop_token_ids:
            check_int("stop_token_ids", token_id, "integers >= 0", lambda v: v >= 0)
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids))
        if not isinstance(self.sampling_params, SamplingParams):
            raise ParameterError(
                "sampling_params", self.sampling_params, "a SamplingParams",
                f"sampling_params must be a SamplingParams, got {type(self.sampling_params).__name__}",
            )
        structured = self.sampling_params.structured
        if structured is not None:
            raise ParameterError(
                structured[0], structured[1], "unset with beam search",
                f"{structured[0]} (structured output) is not supported with beam search (num_beams="
                f"{self.num_beams}); use num_beams=1",
            )
        check("output_scores", self.output_scores)
        check("output_logits", self.output_logits)


@dataclass
class BeamHypothesis:
    """One finished beam: the generated token ids (the prompt excluded, a final stop id included),
    its score as transformers reports it in `sequences_scores` (length-penalized sum of
    log-probabilities), and why it ended ("eos" or "length").

    beam_indices: per generated token, the running beam (0 .. num_beams - 1) it extended, as
    transformers' `beam_indices` without the batch offset. step_scores / step_logits (with
    BeamSearchParams.output_scores / output_logits): per step of its prompt's search, the processed
    log-probabilities / raw logits of all that prompt's beams, float32 [num_beams, vocab] each (the
    same list for every hypothesis of a prompt)."""

    token_ids: list[int]
    score: float
    finish_reason: str
    beam_indices: list[int] = field(default_factory=list)
    step_scores: list[torch.Tensor] | None = None
    step_logits: list[torch.Tensor] | None = None


@dataclass
class _Prompt:
    """One prompt of a group while its beams run."""

    index: int  # position in the caller's list
    token_ids: list[int]
    max_new: int  # max_tokens, capped by the model's context length
    beams: list[Sequence] = field(default_factory=list)  # running beams, num_beams of them
    paths: list[list[int]] = field(default_factory=list)  # per running beam, its beam indices so far
    finished: list[list[int]] = field(default_factory=list)  # generated ids per finished slot
    finished_paths: list[list[int]] = field(default_factory=list)  # beam indices per finished slot
    scores: list[torch.Tensor] = field(default_factory=list)  # per step [num_beams, vocab], if asked
    logits: list[torch.Tensor] = field(default_factory=list)


def beam_search(engine: Engine, prompts: list[list[int]], params: BeamSearchParams) -> list[list[BeamHypothesis]]:
    """Beam search over each prompt (token ids), several prompts batched through the engine's model
    and paged KV cache. Returns, per prompt, `params.num_return_sequences` hypotheses best first:
    the `sequences` / `sequences_scores` transformers' `generate(num_beams=..., do_sample=False)`
    gives for that prompt alone. Needs an idle engine (no queued requests); borrows KV blocks from
    its pool and returns them all."""
    if engine.has_unfinished():
        raise RuntimeError("beam_search needs an idle engine: finish or abort the queued requests first")
    speculative = params.sampling_params.speculative
    if speculative is not None and speculative.is_enabled:
        raise ValueError(
            "beam search cannot be combined with speculative decoding: drop sampling_params.speculative "
            "(prompt_lookup_num_tokens / assistant_model) or use num_beams=1"
        )
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
                f"({capacity} tokens); raise EngineConfig.num_kv_blocks or kv_cache_memory"
            )
        if groups and used + need <= manager.num_free_blocks and rows + num_beams <= engine.config.max_num_seqs:
            groups[-1].append(state)
            used, rows = used + need, rows + num_beams
        else:
            groups.append([state])
            used, rows = need, num_beams
    return groups


class _BeamGroup:
    """Prompts whose beams advance together, one model forward per step; the runner's beam state holds
    one row per prompt still running."""

    def __init__(self, engine: Engine, prompts: list[_Prompt], params: BeamSearchParams) -> None:
        self.engine = engine
        self.runner = engine.runner
        self.manager = engine.block_manager
        self.params = params
        self.prompts = prompts
        self.num_beams = params.num_beams
        self.settings = BeamSettings(
            num_beams=params.num_beams,
            beams_to_keep=max(2, 1 + len(params.stop_token_ids)) * params.num_beams,
            length_penalty=params.length_penalty,
            early_stopping=params.early_stopping,
        )
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
        except BaseException:
            # a step may have pointed a beam at a copy-on-write block not yet copied: keep nothing of
            # the beams in the prefix cache (their full blocks were committed only once computed)
            for seq in self._live.values():
                seq.num_computed_tokens = 0
            raise
        finally:
            for seq in list(self._live.values()):
                self._free(seq)

    def _run(self, results: list[list[BeamHypothesis]]) -> None:
        nb = self.num_beams
        active = list(self.prompts)
        state = self.runner.start_beams([p.max_new for p in active], self.params.stop_token_ids, nb)
        step = self._prefill(active, state)
        while True:
            children: list[Sequence] = []
            old_beams: dict[int, Sequence] = {}
            for row, prompt in enumerate(active):
                if step.scores is not None:
                    prompt.scores.append(step.scores[row])
                if step.logits is not None:
                    prompt.logits.append(step.logits[row])
                parents, tokens = step.parents[row], step.tokens[row]
                # finished slots: j < nb keeps slot j, else candidate j - nb becomes a hypothesis
                prompt.finished, prompt.finished_paths = (
                    [
                        prompt.finished[j] if j < nb else self._generated(prompt, parents[j - nb]) + [tokens[j - nb]]
                        for j in step.finished_slots[row]
                    ],
                    [
                        prompt.finished_paths[j] if j < nb else prompt.paths[parents[j - nb]] + [parents[j - nb]]
                        for j in step.finished_slots[row]
                    ],
                )
                old_beams.update((id(s), s) for s in prompt.beams)
                if not step.keep[row]:
                    results[prompt.index] = self._hypotheses(prompt, step.finished_scores[row])
                    prompt.beams = []
                    continue
                beams, paths = [], []
                for j in step.next_beams[row]:
                    parent = prompt.beams[parents[j]]
                    child = self._new_sequence(prompt, parent.token_ids + [tokens[j]])
                    self.manager.fork(parent, child)
                    child.num_computed_tokens = parent.num_computed_tokens
                    beams.append(child)
                    paths.append(prompt.paths[parents[j]] + [parents[j]])
                prompt.beams, prompt.paths = beams, paths
                children.extend(beams)
            # Children hold references now, so freeing their parents returns only dropped branches.
            for seq in old_beams.values():
                self._free(seq)
            if not children:
                break
            active = [p for p, k in zip(active, step.keep) if k]
            step = self._decode(children, step.state)

    @staticmethod
    def _generated(prompt: _Prompt, beam: int) -> list[int]:
        return prompt.beams[beam].token_ids[len(prompt.token_ids) :]

    def _hypotheses(self, prompt: _Prompt, scores: list[float]) -> list[BeamHypothesis]:
        stops = set(self.params.stop_token_ids)
        step_scores = prompt.scores if self.params.output_scores else None
        step_logits = prompt.logits if self.params.output_logits else None
        out = []
        for tokens, path, score in zip(prompt.finished, prompt.finished_paths, scores):
            reason = "eos" if tokens and tokens[-1] in stops else "length"
            out.append(BeamHypothesis(tokens, score, reason, path, step_scores, step_logits))
        return out[: self.params.num_return_sequences]

    def _step(
        self, chunks: list[SchedulerOutput], rows: list[Sequence], state: BeamState, **kwargs: Any
    ) -> BeamStepResult:
        return self.runner.beam_step(
            chunks, rows, state, self.settings,
            output_scores=self.params.output_scores, output_logits=self.params.output_logits, **kwargs,
        )

    def _prefill(self, prompts: list[_Prompt], state: BeamState) -> BeamStepResult:
        """Compute each prompt once (its blocks are then shared by all its beams), in chunks within the
        token budget, and take the first step from each prompt's last logits."""
        budget_limit = self.engine.config.max_num_batched_tokens
        chunks: list[SchedulerOutput] = []
        pending = list(prompts)
        while pending:
            batch: list[ScheduledSequence] = []
            budget = budget_limit
            while pending and (not batch or len(pending[0].token_ids) <= budget):
                prompt = pending.pop(0)
                seq = self._new_sequence(prompt, list(prompt.token_ids))
                self.manager.record_lookup(seq.num_tokens, self.manager.match_prefix(seq))
                num_new = seq.num_tokens - seq.num_computed_tokens
                self.manager.allocate(seq, num_new)
                batch.append(ScheduledSequence(seq, num_new))
                budget -= num_new
                prompt.beams = [seq] * self.num_beams
                prompt.paths = [[] for _ in range(self.num_beams)]
                prompt.finished = [[] for _ in range(self.num_beams)]
                prompt.finished_paths = [[] for _ in range(self.num_beams)]
            chunks.append(SchedulerOutput(scheduled=batch))
        rows = [beam for prompt in prompts for beam in prompt.beams]
        step = self._step(chunks, rows, state, repeat=self.num_beams)
        seqs = [item.seq for chunk in chunks for item in chunk.scheduled]
        for seq in seqs:
            seq.num_computed_tokens = seq.num_tokens
            self.manager.commit(seq)
        self._free_behind_window(seqs)
        return step

    def _free_behind_window(self, seqs: list[Sequence]) -> None:
        """With a sliding window on every layer, blocks behind each beam's window go back to the pool
        (as the scheduler does): a shared block returns once no beam's window reaches it."""
        window = self.engine.model.config.kv_window
        if window is not None:
            for seq in seqs:
                # The next query sits at num_computed_tokens and reaches back window - 1 positions.
                self.manager.free_blocks_before(seq, seq.num_computed_tokens - window + 1)

    def _decode(self, beams: list[Sequence], state: BeamState) -> BeamStepResult:
        """One token per beam: give each beam a private copy of the block its new token lands in when
        that block is shared, a new block when it starts one, then take the step."""
        sources: list[int] = []
        targets: list[int] = []
        for seq in beams:
            for source, target in self.manager.copy_on_write(seq, 1):
                sources.append(source)
                targets.append(target)
            self.manager.allocate(seq, 1)
        out = SchedulerOutput([ScheduledSequence(s, 1) for s in beams])
        step = self._step([out], beams, state, block_copies=(sources, targets))
        for seq in beams:
            seq.num_computed_tokens += 1
            self.manager.commit(seq)
        self._free_behind_window(beams)
        return step
