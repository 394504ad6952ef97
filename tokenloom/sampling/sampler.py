"""Turns logits into token ids (L1t). A pure function of logits and per-row parameter tensors;
the only per-row Python work is drawing from each request's own random generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenloom.sampling_params import SamplingParams


@dataclass
class SamplingBatch:
    """Per-row parameters for one step, built once by the model runner.

    temperature: [rows] float32; top_p: [rows] float64 (so that 1 - top_p rounds exactly as
    transformers' Python float does); top_k: [rows] long (0 = off); is_greedy: [rows] bool.
    suppress: (row, token) pairs masked to -inf (stop ids before min_tokens is reached).
    generators: one per row, None for greedy rows.
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    is_greedy: torch.Tensor
    all_greedy: bool
    max_top_k: int  # largest top_k of the batch (0: no row uses top-k); known here, no device sync
    any_top_p: bool
    suppress_rows: torch.Tensor | None
    suppress_tokens: torch.Tensor | None
    generators: list[torch.Generator | None]

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        num_outputs: list[int],
        generators: list[torch.Generator | None],
        device: torch.device,
    ) -> SamplingBatch:
        rows, tokens = [], []
        for row, (p, n) in enumerate(zip(params, num_outputs)):
            if n < p.min_tokens and not p.ignore_eos:
                rows.extend([row] * len(p.stop_token_ids))
                tokens.extend(p.stop_token_ids)
        greedy = [p.is_greedy for p in params]
        return cls(
            temperature=torch.tensor([p.temperature or 1.0 for p in params], dtype=torch.float32, device=device),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=_top_p_dtype(device), device=device),
            is_greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            all_greedy=all(greedy),
            max_top_k=max((p.top_k for p in params if not p.is_greedy), default=0),
            any_top_p=any(p.top_p < 1 for p in params if not p.is_greedy),
            suppress_rows=torch.tensor(rows, dtype=torch.long, device=device) if rows else None,
            suppress_tokens=torch.tensor(tokens, dtype=torch.long, device=device) if rows else None,
            generators=generators,
        )


def _top_p_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if torch.device(device).type == "mps" else torch.float64  # MPS has no float64


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_k: int | None = None) -> torch.Tensor:
    """Keep, per row, the tokens whose logit is >= the k-th largest (ties kept, as transformers);
    rows with top_k 0 keep everything. `max_k`, the largest top_k, saves a device sync."""
    vocab = logits.shape[-1]
    k = top_k.clamp(max=vocab)  # [rows]
    max_k = min(int(k.max()) if max_k is None else max_k, vocab)
    if max_k == 0:
        return logits
    top_values = torch.topk(logits, max_k, dim=-1).values  # [rows, max_k]
    threshold = top_values.gather(1, (k.clamp(min=1) - 1)[:, None])  # [rows, 1]
    threshold = threshold.masked_fill((k == 0)[:, None], float("-inf"))
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filtering with transformers' convention: drop the tokens whose ascending cumulative
    probability is <= 1 - top_p, always keeping the most likely token. Rows with top_p >= 1 are left
    untouched (transformers skips the warper there; the cumulative sum could otherwise drop tokens
    whose probability underflows to 0). Pass top_p as float64 to round 1 - top_p as transformers does."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    cutoff = (1 - top_p).to(cumulative.dtype)[:, None]  # [rows, 1]
    remove_sorted = (cumulative <= cutoff) & (top_p < 1)[:, None]
    remove_sorted[:, -1] = False
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Raw logits [rows, vocab] -> processed logits (masks, temperature, top-k, top-p), float32."""
    logits = logits.float()
    if batch.suppress_rows is not None:
        # out of place: the caller's logits stay as they were
        logits = logits.index_put((batch.suppress_rows, batch.suppress_tokens), logits.new_tensor(float("-inf")))
    if batch.all_greedy:
        return logits
    logits = logits / batch.temperature[:, None]
    if batch.max_top_k > 0:
        logits = apply_top_k(logits, batch.top_k, batch.max_top_k)
    if batch.any_top_p:
        logits = apply_top_p(logits, batch.top_p)
    return logits


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits: [rows, vocab] raw -> token ids [rows]."""
    processed = process_logits(logits, batch)
    greedy_ids = processed.argmax(dim=-1)
    if batch.all_greedy:
        return greedy_ids
    probs = processed.softmax(dim=-1)
    ids = greedy_ids.clone()
    for row, generator in enumerate(batch.generators):
        if generator is not None:
            ids[row] = torch.multinomial(probs[row], 1, generator=generator)[0]
    return ids
