"""A model-runner step with speculating rows (L4): one forward over every row's tokens, logits at each
proposed position, verification. Rows without proposals in the same step are sampled exactly as in a
plain step (`ModelRunner.sample`)."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch

from tokenloom.engine.scheduler import SchedulerOutput
from tokenloom.sampling.sampler import SamplingBatch, process_logits
from tokenloom.sampling.speculative import verify_greedy, verify_sampled

if TYPE_CHECKING:
    from tokenloom.engine.model_runner import ModelRunner, StepResult


def speculative_step(runner: ModelRunner, out: SchedulerOutput, draft_probs: dict[str, torch.Tensor]) -> StepResult:
    """sampled_token_ids holds an int for a plain row and a list (accepted proposed tokens, then the
    target's own) for a speculating row, in scheduled order of the sampling rows.

    When every row decodes (no prompt chunk in the step), each position to verify is a row of a decode
    step: the same path (fused on the CPU) and so the same numbers as plain decoding would give at
    that position, which keeps greedy output identical to plain greedy in every weight mode. A step of
    sequences few enough for the quantized kernels (plain decoding would use them) verifies in calls
    of at most that many rows, so that the extra rows do not switch it to the dense copies; a later
    call of one sequence's positions sees the keys its earlier call wrote."""
    sampling = [item for item in out.scheduled if item.samples]
    device = runner.device
    if len(sampling) == len(out.scheduled) and all(
        item.num_new_tokens == 1 + len(item.spec_token_ids) for item in sampling
    ):
        input_ids, context_lens, block_tables = [], [], []
        for item in sampling:
            seq = item.seq
            start = seq.num_computed_tokens
            for j, token in enumerate([seq.token_ids[start], *item.spec_token_ids]):
                input_ids.append(token)
                context_lens.append(start + j + 1)
                block_tables.append(seq.block_ids)
        limit = runner.kernel_rows_limit
        width = len(input_ids) if limit is None or len(sampling) > limit else limit
        logits = torch.cat([
            runner.decode_rows_logits(input_ids[a : a + width], context_lens[a : a + width], block_tables[a : a + width])
            for a in range(0, len(input_ids), width)
        ])  # [positions, vocab]
    else:
        hidden = runner.forward_hidden(out)  # [num_tokens, hidden]
        positions: list[int] = []
        for end, item in zip(itertools.accumulate(i.num_new_tokens for i in out.scheduled), out.scheduled):
            if item.samples:
                positions.extend(range(end - 1 - len(item.spec_token_ids), end))  # the last known token on
        logits = runner.model.compute_logits(hidden[torch.tensor(positions, device=device)])  # [positions, vocab]
    firsts = list(itertools.accumulate((len(i.spec_token_ids) + 1 for i in sampling), initial=0))
    plain = [row for row, item in enumerate(sampling) if not item.spec_token_ids]
    speculating = [row for row, item in enumerate(sampling) if item.spec_token_ids]

    from tokenloom.engine.model_runner import StepResult

    result = StepResult([0] * len(sampling), [None] * len(sampling), [None] * len(sampling), [None] * len(sampling))
    if plain:
        rows = torch.tensor([firsts[row] for row in plain], device=device)
        part = runner.sample(logits[rows], [sampling[row].seq for row in plain])
        for i, row in enumerate(plain):
            result.sampled_token_ids[row] = part.sampled_token_ids[i]
            result.logprobs[row], result.scores[row], result.logits[row] = part.logprobs[i], part.scores[i], part.logits[i]
    # Each proposed position is scored as plain decoding would score it there: the processors see
    # the sequence followed by the proposed tokens before that position.
    params, histories, num_prompt, generators, spans = [], [], [], [], []
    for row in speculating:
        seq, proposed = sampling[row].seq, sampling[row].spec_token_ids
        generator = None if seq.params.is_greedy else runner.generator(seq.request_id)
        for j in range(len(proposed) + 1):
            params.append(seq.params)
            histories.append(seq.token_ids + proposed[:j])
            num_prompt.append(seq.num_prompt_tokens)
            generators.append(generator)
        spans.append((firsts[row], firsts[row + 1]))
    if not speculating:
        return result
    index = torch.tensor([p for a, b in spans for p in range(a, b)], device=device)
    spec_logits = logits[index]  # [sum(k + 1), vocab]
    batch = SamplingBatch.build(params, histories, num_prompt, generators, device, vocab_size=spec_logits.shape[-1])
    processed = process_logits(spec_logits, batch)
    argmax = processed.argmax(dim=-1).tolist()
    offset = 0
    for row, (a, b) in zip(speculating, spans):
        seq, proposed = sampling[row].seq, sampling[row].spec_token_ids
        width = b - a
        if seq.params.is_greedy:
            result.sampled_token_ids[row] = verify_greedy(argmax[offset : offset + width], proposed)
        else:
            result.sampled_token_ids[row] = verify_sampled(
                processed[offset : offset + width], proposed, draft_probs.get(seq.request_id),
                runner.generator(seq.request_id),
            )
        offset += width
    return result
