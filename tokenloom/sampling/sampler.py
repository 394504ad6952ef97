"""Turns logits into token ids (L1t). A pure function of logits and per-row tensors built once per
step; the only per-row Python work is one uniform draw from each sampling row's own generator.
The model runner keeps a `SamplingState` across steps (per-request histories, the batch's parameter
tensors), so that building a step's batch costs O(new tokens), not O(history).

Order, as transformers' `_get_logits_processor`: sequence bias, repetition penalty, (presence and
frequency penalties, OpenAI/vLLM, which transformers lacks), no-repeat n-grams, bad words,
min_tokens, suppress_tokens, begin_suppress_tokens; then the grammar mask of structured-output rows
(tokenloom.sampling.grammar); then, for sampling rows only, temperature,
top-k, top-p, min-p, typical, epsilon, eta; then renormalize_logits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenloom.outputs import TokenLogprob
from tokenloom.sampling.grammar import GrammarMask, GrammarMatcher, apply_grammar_mask
from tokenloom.sampling.processors import (
    PairCollector,
    RowValues,
    TokenPairs,
    apply_bans,
    apply_epsilon,
    apply_eta,
    apply_min_p,
    apply_presence_frequency,
    apply_renormalize,
    apply_repetition_penalty,
    apply_sequence_bias,
    apply_temperature,
    apply_top_k,
    apply_typical,
    bad_words_for_row,
    ngram_bans_for_row,
    sequence_bias_for_row,
)
from tokenloom.sampling.state import SamplingState, concat_pairs, in_vocab, row_settings, wide_float
from tokenloom.sampling.top_p import apply_top_p
from tokenloom.sampling_params import SamplingParams

__all__ = [
    "SamplingBatch", "SamplingState", "apply_top_k", "apply_top_p", "process_logits", "sample", "sample_processed", "token_logprobs",
]


@dataclass
class SamplingBatch:
    """Everything one step's sampler needs, per row; built once per step by `build`.

    A field left None means no row of the batch uses that processor, so it costs nothing. A warper
    holds the values of the sampling rows that use it (not at its neutral value: temperature 1,
    top_k 0, top_p/typical_p 1, min_p/epsilon/eta 0) and runs on those rows only. top_p is float64
    so that 1 - top_p rounds exactly as transformers' Python float does.
    generators: one per row; a row without one takes the argmax of its processed logits.
    """

    all_greedy: bool
    generators: list[torch.Generator | None]
    sequence_bias: TokenPairs | None = None  # values: the bias
    repetition: TokenPairs | None = None  # every token of prompt + output; values: the penalty
    generated_counts: TokenPairs | None = None  # output tokens; values: how often each was generated
    frequency_penalty: torch.Tensor | None = None  # [rows] float32
    presence_penalty: torch.Tensor | None = None  # [rows] float32
    banned: TokenPairs | None = None  # set to -inf
    grammar: GrammarMask | None = None  # structured-output rows: tokens their grammar does not allow -> -inf
    temperature: RowValues | None = None
    top_k: RowValues | None = None
    max_top_k: int = 0  # the largest top_k of the sampling rows: a top-k over that many, no device sync
    top_p: RowValues | None = None
    min_p: RowValues | None = None
    typical_p: RowValues | None = None
    epsilon_cutoff: RowValues | None = None
    eta_cutoff: RowValues | None = None
    renormalize: torch.Tensor | None = None  # [rows] bool, None when no row or every row renormalizes
    all_renormalize: bool = False

    sample_rows: torch.Tensor | None = None  # [n] long: the rows with a generator, when known up front

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        token_ids: Sequence[Sequence[int]],
        num_prompt_tokens: Sequence[int],
        generators: list[torch.Generator | None],
        device: torch.device,
        vocab_size: int | None = None,
        state: SamplingState | None = None,
        request_ids: Sequence[str] | None = None,
        grammars: Sequence[GrammarMatcher | None] | None = None,
    ) -> SamplingBatch:
        """params, token_ids (prompt + generated so far), num_prompt_tokens and generators: one entry
        per row. Ids >= vocab_size in the parameters are ignored (the model cannot produce them).

        Without `state` everything is computed from the token lists (O(history) per row). With a
        `state` (and each row's request id) the history-derived parts come from per-request state
        kept across steps and the per-row parameter tensors are reused while the batch's settings
        do not change: O(new tokens) per step. `grammars`: per row its grammar state (None: unconstrained),
        whose next-token mask is applied after the processors and before the warpers."""
        histories = state.histories(request_ids, params, token_ids, num_prompt_tokens) if state else None
        is_in_vocab = in_vocab(vocab_size)
        bias, seen, counts, banned = PairCollector(), PairCollector(), PairCollector(), PairCollector()
        seen_parts: list[tuple[int, torch.Tensor, float]] = []  # (row, ids, penalty) from histories
        count_parts: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (row, ids, counts)
        for row, (p, ids, num_prompt) in enumerate(zip(params, token_ids, num_prompt_tokens)):
            num_output = len(ids) - num_prompt
            history = histories[row] if histories is not None else None
            if p.sequence_bias:
                row_bias = {t: b for t, b in sequence_bias_for_row(ids, p.sequence_bias).items() if is_in_vocab(t)}
                bias.add(row, list(row_bias), list(row_bias.values()))
            # ids of the history are always in the vocabulary: no range filter for them
            if p.repetition_penalty != 1.0:
                if history is not None:
                    seen_parts.append((row, history.seen_ids.view(), p.repetition_penalty))
                else:
                    unique = list(set(ids))
                    seen.add(row, unique, [p.repetition_penalty] * len(unique))
            if p.presence_penalty or p.frequency_penalty:
                if history is not None:
                    if history.count_ids.size:
                        count_parts.append((row, history.count_ids.view(), history.count_values.view()))
                else:
                    generated = Counter(ids[num_prompt:])
                    counts.add(row, list(generated), [float(c) for c in generated.values()])
            bans: set[int] = {t for t in p.suppress_tokens if is_in_vocab(t)}
            if p.bad_words_ids:
                bans |= {t for t in bad_words_for_row(ids, p.bad_words_ids, p.stop_token_ids) if is_in_vocab(t)}
            if num_output < p.min_tokens and not p.ignore_eos:
                bans.update(t for t in p.stop_token_ids if is_in_vocab(t))
            if num_output == 0:
                bans.update(t for t in p.begin_suppress_tokens if is_in_vocab(t))
            if p.no_repeat_ngram_size:
                bans |= history.ngram_bans() if history is not None else ngram_bans_for_row(ids, p.no_repeat_ngram_size)
            if bans:
                banned.add(row, sorted(bans))

        fields = state.row_settings(params, generators) if state else row_settings(params, generators, device)
        repetition = seen.build(device)
        if seen_parts:
            repetition = state.repetition_pairs(request_ids, seen_parts, histories)  # type: ignore[union-attr,arg-type]
        counts_pairs = counts.build(device)
        if count_parts:
            counts_pairs = concat_pairs(counts_pairs, count_parts, device)
        return cls(
            generators=generators,
            sequence_bias=bias.build(device),
            repetition=repetition,
            generated_counts=counts_pairs,
            frequency_penalty=fields.frequency_penalty if counts_pairs is not None else None,
            presence_penalty=fields.presence_penalty if counts_pairs is not None else None,
            banned=banned.build(device),
            grammar=GrammarMask.build(grammars, vocab_size, device) if grammars and any(grammars) else None,
            **fields.warpers,
        )


def process_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Raw logits [rows, vocab] -> processed scores [rows, vocab] float32: what transformers returns
    as `scores` (every processor, the warpers for sampling rows). The input is never modified."""
    logits = logits.float()
    if batch.sequence_bias is not None:
        logits = apply_sequence_bias(logits, batch.sequence_bias)
    if batch.repetition is not None:
        logits = apply_repetition_penalty(logits, batch.repetition)
    if batch.generated_counts is not None:
        logits = apply_presence_frequency(
            logits, batch.generated_counts, batch.frequency_penalty, batch.presence_penalty
        )
    if batch.banned is not None:
        logits = apply_bans(logits, batch.banned)
    if batch.grammar is not None:
        logits = apply_grammar_mask(logits, batch.grammar)
    if batch.temperature is not None:
        logits = batch.temperature.apply(logits, apply_temperature)
    if batch.top_k is not None:
        logits = batch.top_k.apply(logits, lambda rows, top_k: apply_top_k(rows, top_k, batch.max_top_k))
    for warper, apply in (
        (batch.top_p, apply_top_p),
        (batch.min_p, apply_min_p),
        (batch.typical_p, apply_typical),
        (batch.epsilon_cutoff, apply_epsilon),
        (batch.eta_cutoff, apply_eta),
    ):
        if warper is not None:
            logits = warper.apply(logits, apply)
    if batch.all_renormalize or batch.renormalize is not None:
        logits = apply_renormalize(logits, batch.renormalize)
    return logits


def sample_processed(processed: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Processed scores [rows, vocab] -> token ids [rows]: the argmax for greedy rows, a draw from
    softmax(scores) for rows with a generator. The draw is an inverse-CDF lookup of one uniform
    number from the row's own generator, so it depends on nothing but that row."""
    ids = processed.argmax(dim=-1)
    if batch.all_greedy:
        return ids
    rows = [row for row, g in enumerate(batch.generators) if g is not None]
    if not rows:
        return ids
    device = processed.device
    dtype = wide_float(device)
    # one draw from each row's own generator: the row's stream must not depend on the batch
    uniform = torch.stack(
        [torch.rand((), generator=batch.generators[row], dtype=dtype, device=device) for row in rows]
    )  # [n]
    index = batch.sample_rows if batch.sample_rows is not None else torch.tensor(rows, dtype=torch.long, device=device)
    cdf = processed[index].softmax(dim=-1).to(dtype).cumsum(dim=-1)  # [n, vocab]
    total = cdf[:, -1:]
    # strictly below the total, so the token found has a probability > 0
    target = torch.minimum(uniform[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    drawn = torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=processed.shape[-1] - 1)
    return ids.index_put((index,), drawn)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Raw logits [rows, vocab] -> token ids [rows]."""
    return sample_processed(process_logits(logits, batch), batch)


def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: Sequence[int | None]
) -> list[TokenLogprob | None]:
    """Per row that asks (num_top[i] not None): log-softmax of the raw logits [rows, vocab] at the
    chosen token_ids[i] and the num_top[i] most likely (id, logprob) pairs; nothing for other rows."""
    wanted = [row for row, k in enumerate(num_top) if k is not None]
    result: list[TokenLogprob | None] = [None] * len(num_top)
    if not wanted:
        return result
    index = torch.tensor(wanted, dtype=torch.long, device=logits.device)
    logprobs = logits[index].float().log_softmax(dim=-1)  # [n, vocab]
    chosen_ids = token_ids[index]
    chosen = logprobs.gather(1, chosen_ids[:, None])[:, 0]
    max_k = min(max(num_top[row] for row in wanted), logprobs.shape[-1])
    # one device-to-host transfer: float64 holds every id and every float32 logprob exactly (MPS has
    # no float64; its float32 still holds ids below 2**24)
    wide = wide_float(logits.device)
    parts = [chosen_ids[:, None].to(wide), chosen[:, None].to(wide)]  # [n, 1] each
    if max_k:
        top = logprobs.topk(max_k, dim=-1)
        parts += [top.indices.to(wide), top.values.to(wide)]  # [n, max_k] each
    table = torch.cat(parts, dim=1).tolist()  # [n, 2 + 2 * max_k]
    for i, row in enumerate(wanted):
        k = num_top[row]
        line = table[i]
        top_ids, top_values = line[2 : 2 + max_k], line[2 + max_k :]
        result[row] = TokenLogprob(
            int(line[0]), line[1], [(int(t), v) for t, v in zip(top_ids[:k], top_values[:k])]
        )
    return result
