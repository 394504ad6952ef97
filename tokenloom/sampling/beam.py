"""Beam-search scoring and selection as tensor math (L1t), step for step transformers' `_beam_search`
(`transformers/generation/utils.py`): log-softmax of the raw logits, the logits processors on those
log-probabilities, plus the running beam scores, the top `beams_to_keep` candidates over
`num_beams * vocab`, the best `num_beams` of them that did not stop run on, the stopped ones among the
first `num_beams` compete with the finished hypotheses (length-penalized), and the early-stopping
heuristic. The operations are transformers' own, in its order, for the same rounding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from tokenloom.sampling.sampler import SamplingBatch, process_logits

DEAD = -1.0e9  # transformers' "very large negative" score for beams that may not be chosen


@dataclass(frozen=True)
class BeamSettings:
    num_beams: int
    beams_to_keep: int  # candidates per prompt and step: max(2, 1 + num_stop_ids) * num_beams
    length_penalty: float
    early_stopping: bool | Literal["never"]


@dataclass
class BeamState:
    """transformers' running state, one row per prompt still searching."""

    running_scores: torch.Tensor  # [rows, num_beams] summed log-probabilities of the running beams
    finished_scores: torch.Tensor  # [rows, num_beams] length-penalized scores of the finished slots
    is_finished: torch.Tensor  # [rows, num_beams] bool, slot holds a hypothesis
    improvable: torch.Tensor  # [rows, 1] bool, the early-stopping heuristic is not yet satisfied
    max_new: torch.Tensor  # [rows] long, each prompt's token limit
    stop_ids: torch.Tensor  # [num_stop_ids] long
    step: int = 0  # tokens generated so far by every running beam

    @classmethod
    def start(cls, max_new: torch.Tensor, stop_ids: torch.Tensor, num_beams: int) -> BeamState:
        rows, device = max_new.shape[0], max_new.device
        running = torch.zeros((rows, num_beams), dtype=torch.float, device=device)
        running[:, 1:] = DEAD  # only beam 0 may extend at the first step
        return cls(
            running_scores=running,
            finished_scores=torch.full((rows, num_beams), DEAD, dtype=torch.float, device=device),
            is_finished=torch.zeros((rows, num_beams), dtype=torch.bool, device=device),
            improvable=torch.ones((rows, 1), dtype=torch.bool, device=device),
            max_new=max_new,
            stop_ids=stop_ids,
        )

    def keep_rows(self, keep: torch.Tensor) -> BeamState:
        """The state of the rows where `keep` ([rows] bool) is set."""
        return BeamState(
            self.running_scores[keep], self.finished_scores[keep], self.is_finished[keep],
            self.improvable[keep], self.max_new[keep], self.stop_ids, self.step,
        )


@dataclass
class BeamChoice:
    """What one step decided, per prompt row (indices, for the block and hypothesis bookkeeping)."""

    parents: torch.Tensor  # [rows, beams_to_keep] long, the running beam each candidate extends
    tokens: torch.Tensor  # [rows, beams_to_keep] long, the candidate's new token
    next_beams: torch.Tensor  # [rows, num_beams] long, the candidates that run on, in beam order
    finished_slots: torch.Tensor  # [rows, num_beams] long, j < num_beams keeps finished slot j, else candidate j - num_beams
    finished_scores: torch.Tensor  # [rows, num_beams] float, the finished slots' scores after this step
    keep: torch.Tensor  # [rows] bool, the prompt searches on

    def packed(self) -> torch.Tensor:
        """Everything in one float64 tensor [rows, 2 * beams_to_keep + 3 * num_beams + 1] (integers
        this small are exact), so that one transfer brings a step's decisions to Python."""
        return torch.cat(
            (self.parents, self.tokens, self.next_beams, self.finished_slots, self.finished_scores,
             self.keep[:, None]), dim=1,
        ).double()


def beam_log_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Raw logits [beams, vocab] -> the processed log-probabilities transformers records as `scores`
    in beam search: log-softmax first, then the processors (a repetition penalty multiplies a
    negative log-probability, for instance)."""
    return process_logits(torch.log_softmax(logits.float(), dim=-1), batch)


def select_beams(log_probs: torch.Tensor, state: BeamState, settings: BeamSettings) -> tuple[BeamState, BeamChoice]:
    """One step over the processed log-probabilities [rows * num_beams, vocab] (beams of a prompt
    adjacent). Returns the state for the next step (every row kept: drop rows with `keep_rows`) and
    the choice."""
    nb, lp, early = settings.num_beams, settings.length_penalty, settings.early_stopping
    rows, vocab = log_probs.shape[0] // nb, log_probs.shape[-1]
    scores = log_probs.view(rows, nb, vocab) + state.running_scores[:, :, None]
    topk_scores, topk_indices = torch.topk(scores.reshape(rows, nb * vocab), k=settings.beams_to_keep)
    parents = topk_indices // vocab
    tokens = topk_indices % vocab
    step = state.step
    hits = torch.isin(tokens, state.stop_ids) | (step + 1 >= state.max_new)[:, None]  # stop id or length limit

    # the running beams of the next step: the best candidates that did not stop
    running_all = topk_scores + hits.to(torch.float32) * DEAD
    next_beams = torch.topk(running_all, k=nb)[1]
    running_scores = running_all.gather(1, next_beams)

    # finished hypotheses: the stopped candidates among the first num_beams compete with those kept so far
    top_mask = torch.arange(settings.beams_to_keep, device=log_probs.device) < nb
    just_finished = hits & top_mask[None, :]
    candidate = topk_scores / ((step + 1) ** lp)
    full = torch.all(state.is_finished, dim=-1, keepdim=True) & (early is True)
    candidate += full.to(torch.float32) * DEAD
    candidate += (~state.improvable).to(torch.float32) * DEAD
    candidate += (~just_finished) * DEAD
    merged = torch.cat((state.finished_scores, candidate), dim=1)
    finished_slots = torch.topk(merged, k=nb)[1]
    finished_scores = merged.gather(1, finished_slots)
    is_finished = torch.cat((state.is_finished, just_finished), dim=1).gather(1, finished_slots)

    # the early-stopping heuristic, at the new length
    step += 1
    if early == "never" and lp > 0.0:  # the longest each prompt could still get
        best_possible = running_scores[:, :1] / (state.max_new[:, None].double() ** lp).float()
    else:
        best_possible = running_scores[:, :1] / (step**lp)
    worst = torch.where(is_finished, torch.min(finished_scores, dim=-1, keepdim=True)[0], DEAD)
    improvable = state.improvable & torch.any(best_possible > worst, dim=-1, keepdim=True)
    exists_open = ~(torch.all(is_finished, dim=-1) & (early is True))
    can_continue = ~torch.all(hits, dim=-1)
    keep = improvable[:, 0] & exists_open & can_continue

    new_state = BeamState(
        running_scores, finished_scores, is_finished, improvable, state.max_new, state.stop_ids, step
    )
    choice = BeamChoice(parents, tokens, next_beams, finished_slots, finished_scores, keep)
    return new_state, choice
