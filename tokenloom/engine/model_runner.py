"""SchedulerOutput -> tensors -> model -> sampler -> token ids (L4). The only place lists of
tokens become tensors."""

from __future__ import annotations

import contextlib
import functools
import itertools
import warnings
from dataclasses import dataclass, field

import torch

from tokenloom.attention.decode import DecodeMetadata
from tokenloom.attention.paged import AttentionMetadata
from tokenloom.cache.kv_cache import KVCache
from tokenloom.engine.compiled_decode import CompiledDecode, compile_blocker
from tokenloom.engine.scheduler import SchedulerOutput
from tokenloom.engine.sequence import Sequence
from tokenloom.models.base import CausalLM
from tokenloom.models.row_floor import dense_row_floor
from tokenloom.outputs import TokenLogprob
from tokenloom.sampling.beam import BeamSettings, BeamState, beam_log_probs, select_beams
from tokenloom.sampling.sampler import (
    SamplingBatch,
    SamplingState,
    process_logits,
    sample_processed,
    token_logprobs,
)


@dataclass
class StepResult:
    """One entry per sampling sequence, in scheduled order. logprobs/scores/logits hold None for
    rows whose parameters did not ask for them (SamplingParams.logprobs / output_scores /
    output_logits); scores are the processed float32 row (after every processor and warper, as
    transformers' `scores`), logits the raw float32 row."""

    sampled_token_ids: list[int | list[int]]  # a list for a speculating row (see spec_step)
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    scores: list[torch.Tensor | None] = field(default_factory=list)  # processed, [vocab]
    logits: list[torch.Tensor | None] = field(default_factory=list)  # raw, [vocab]


@dataclass
class BeamStepResult:
    """One beam-search step, one entry per prompt row (see `tokenloom.sampling.beam.BeamChoice`),
    brought to Python in one transfer. `state` holds only the rows that search on. scores / logits
    (when asked for): per prompt row the processed log-probabilities / raw float32 logits of its beams,
    [num_beams, vocab] each, as transformers records them."""

    parents: list[list[int]]
    tokens: list[list[int]]
    next_beams: list[list[int]]
    finished_slots: list[list[int]]
    finished_scores: list[list[float]]
    keep: list[bool]
    state: BeamState
    scores: list[torch.Tensor] | None = None
    logits: list[torch.Tensor] | None = None


class ModelRunner:
    """`compile`: True runs decode-only steps through compiled graphs (`CompiledDecode`), each batch
    bucket compiled on its first use; False (the default) keeps every step eager; None compiles
    once `compile_after` decode-only steps have run eagerly (a one-off generate never pays for a
    compilation). Without a working compiler (no C++ compiler for inductor on the CPU) every step
    is eager."""

    def __init__(
        self,
        model: CausalLM,
        kv_cache: KVCache,
        device: torch.device,
        *,
        compile: bool | None = False,
        compile_after: int = 256,
        max_num_seqs: int = 64,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self._generators: dict[str, torch.Generator] = {}
        # per-request processor state (seen ids, counts, n-gram tables) kept across steps
        self._sampling_state = SamplingState(device)
        self.compiled: CompiledDecode | None = None
        blocker = compile_blocker(model, device) if compile is not False else None
        if compile is not False and blocker is None:
            self.compiled = CompiledDecode(model, kv_cache, device, max_num_seqs)
        elif compile is True:
            warnings.warn(f"compile=True: the decode step runs eagerly ({blocker})", RuntimeWarning, stacklevel=3)
        self._compile_after = 0 if compile else compile_after
        self.num_decode_steps = 0  # decode-only steps run so far

    @property
    def block_size(self) -> int:
        return self.kv_cache.block_size

    def register_seed(self, request_id: str, seed: int) -> None:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        self._generators[request_id] = generator

    def generator(self, request_id: str) -> torch.Generator | None:
        """The request's own generator (None for a greedy request)."""
        return self._generators.get(request_id)

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        self._sampling_state.release(request_id)

    @torch.inference_mode()
    def forward_hidden(self, out: SchedulerOutput) -> torch.Tensor:
        """Run the model over the step's tokens; returns hidden states [num_tokens, hidden]."""
        input_ids: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        block_tables: list[list[int]] = []
        for item in out.scheduled:
            seq = item.seq
            start = seq.num_computed_tokens
            end = start + item.num_new_tokens
            input_ids.extend(seq.token_ids[start:end])
            input_ids.extend(item.spec_token_ids)  # proposed tokens follow the known ones
            query_lens.append(item.num_new_tokens)
            context_lens.append(end)
            block_tables.append(seq.block_ids)
        # one host-to-device copy carries the token ids and the attention metadata; positions and
        # slots are computed on the device
        meta = AttentionMetadata.build(
            query_lens, context_lens, block_tables, self.block_size, self.device, input_ids=input_ids
        )
        prompt_step = self.device.type == "cpu" and any(item.num_new_tokens > 1 for item in out.scheduled)
        # prompt tokens: the same rounding however the prompt was cut (see models/row_floor.py)
        with dense_row_floor() if prompt_step else contextlib.nullcontext():
            return self.model(meta.input_ids, meta.positions, self.kv_cache, meta)

    @torch.inference_mode()
    def decode_logits(self, out: SchedulerOutput) -> torch.Tensor:
        """Logits [num_seqs, vocab] of a decode-only step (every scheduled sequence one new token):
        through the compiled graph when it is on and ready, else eagerly over DecodeMetadata."""
        input_ids, context_lens, block_tables = [], [], []
        for item in out.scheduled:
            seq = item.seq
            end = seq.num_computed_tokens + 1
            input_ids.append(seq.token_ids[end - 1])
            context_lens.append(end)
            block_tables.append(seq.block_ids)
        self.num_decode_steps += 1
        compiled = self.compiled
        if compiled is not None and self.num_decode_steps > self._compile_after:
            logits = compiled.run(input_ids, context_lens, block_tables)
            if logits is not None:
                return logits
        return self.decode_rows_logits(input_ids, context_lens, block_tables)

    @functools.cached_property
    def kernel_rows_limit(self) -> int | None:
        """The widest call the model's quantized kernels take (wider ones use its dense copies), or
        None when no layer switches by width (the exact mode)."""
        from tokenloom.models.head import ShortlistHead
        from tokenloom.models.linear import QuantizedLinear

        limits = {m.max_kernel_rows for m in self.model.modules()
                  if (isinstance(m, QuantizedLinear) and m.keeps_dense) or isinstance(m, ShortlistHead)}
        return min(limits) if limits else None

    def decode_rows_logits(
        self, input_ids: list[int], context_lens: list[int], block_tables: list[list[int]]
    ) -> torch.Tensor:
        """Logits [rows, vocab] of one query per row, eagerly over DecodeMetadata: row i is the token
        at position context_lens[i] - 1 of the sequence whose blocks are block_tables[i]. Several rows
        may be consecutive positions of one sequence (a speculative verify): every row's keys and
        values are written before any row attends, so each sees those before it."""
        meta = DecodeMetadata.build(
            input_ids, context_lens, block_tables, self.block_size, self.device, self.kv_cache.scratch_slot
        )
        hidden = self.model(meta.input_ids, meta.positions, self.kv_cache, meta)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def step(self, out: SchedulerOutput, draft_probs: dict[str, torch.Tensor] | None = None) -> StepResult:
        """draft_probs: for speculating rows whose proposer drew its tokens from a distribution (a
        draft model sampling), that distribution [k, vocab] by request id."""
        sampling = [item.seq for item in out.scheduled if item.samples]
        if not sampling:
            self.forward_hidden(out)
            return StepResult([])
        if any(item.spec_token_ids for item in out.scheduled):
            from tokenloom.engine.spec_step import speculative_step

            return speculative_step(self, out, draft_probs or {})
        if all(item.num_new_tokens == 1 for item in out.scheduled):
            logits = self.decode_logits(out)  # [num_seqs, vocab]
            if len(sampling) != len(out.scheduled):
                keep = [row for row, item in enumerate(out.scheduled) if item.samples]
                logits = logits[torch.tensor(keep, device=self.device)]
        else:
            hidden = self.forward_hidden(out)
            rows = [end - 1 for end, item in zip(
                itertools.accumulate(item.num_new_tokens for item in out.scheduled), out.scheduled
            ) if item.samples]
            logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])  # [rows, vocab]
        return self.sample(logits, sampling)

    def sample(self, logits: torch.Tensor, sampling: list[Sequence]) -> StepResult:
        """One token per row of logits [rows, vocab] (row i: the next token of sampling[i])."""
        params = [s.params for s in sampling]
        batch = SamplingBatch.build(
            params,
            [s.token_ids for s in sampling],
            [s.num_prompt_tokens for s in sampling],
            [None if p.is_greedy else self._generators.get(s.request_id) for p, s in zip(params, sampling)],
            self.device,
            vocab_size=logits.shape[-1],
            state=self._sampling_state,
            request_ids=[s.request_id for s in sampling],
            grammars=[s.grammar for s in sampling],
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

    @torch.inference_mode()
    def start_beams(self, max_new: list[int], stop_token_ids: list[int], num_beams: int) -> BeamState:
        """The beam-search state for prompts with these token limits (one row each)."""
        return BeamState.start(
            torch.tensor(max_new, dtype=torch.long, device=self.device),
            torch.tensor(stop_token_ids, dtype=torch.long, device=self.device),
            num_beams,
        )

    @torch.inference_mode()
    def beam_step(
        self,
        chunks: list[SchedulerOutput],
        beams: list[Sequence],
        state: BeamState,
        settings: BeamSettings,
        block_copies: tuple[list[int], list[int]] = ([], []),
        repeat: int = 1,
        output_scores: bool = False,
        output_logits: bool = False,
    ) -> BeamStepResult:
        """One beam-search step: copy the blocks (copy-on-write sources -> targets), run the model over
        each chunk, take the logits of every scheduled sequence's last token (each repeated `repeat`
        times: a prompt's first logits serve all its beams), score them with the processors of `beams`
        (one per row, a prompt's beams adjacent) and select as transformers does."""
        self.kv_cache.copy_blocks(*block_copies)
        last_logits = []
        for out in chunks:
            hidden = self.forward_hidden(out)  # [num_tokens, hidden]
            ends = list(itertools.accumulate(item.num_new_tokens for item in out.scheduled))
            last_logits.append(self.model.compute_logits(hidden[torch.tensor(ends, device=self.device) - 1]))
        logits = torch.cat(last_logits).float()  # [num_beams_total, vocab]
        if repeat > 1:
            logits = logits.repeat_interleave(repeat, dim=0)
        batch = SamplingBatch.build(
            [seq.params for seq in beams],
            [seq.token_ids for seq in beams],
            [seq.num_prompt_tokens for seq in beams],
            [None] * len(beams),
            self.device,
            vocab_size=logits.shape[-1],
        )
        log_probs = beam_log_probs(logits, batch)  # [rows * num_beams, vocab]
        state, choice = select_beams(log_probs, state, settings)
        packed = choice.packed().tolist()  # the step's one transfer
        k, nb = settings.beams_to_keep, settings.num_beams
        a, b, c, d, e = itertools.accumulate((k, k, nb, nb, nb))  # column bounds in `packed`
        result = BeamStepResult(
            parents=[[int(x) for x in row[:a]] for row in packed],
            tokens=[[int(x) for x in row[a:b]] for row in packed],
            next_beams=[[int(x) for x in row[b:c]] for row in packed],
            finished_slots=[[int(x) for x in row[c:d]] for row in packed],
            finished_scores=[row[d:e] for row in packed],
            keep=[bool(row[e]) for row in packed],
            state=state,
        )
        if not all(result.keep):
            result.state = state.keep_rows(choice.keep)
        if output_scores:
            result.scores = list(log_probs.split(nb))
        if output_logits:
            result.logits = list(logits.split(nb))
        return result
