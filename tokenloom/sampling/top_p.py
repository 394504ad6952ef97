"""TopPLogitsWarper over each row's most likely tokens (L1t): a top-k instead of a sort of the
vocabulary, the same kept set as transformers."""

from __future__ import annotations

import torch

NEG_INF = float("-inf")

# How many of a row's most likely tokens top-p looks at, in turn, before it sorts the vocabulary.
TOP_P_CANDIDATES = (256, 4096)


def apply_top_p(
    logits: torch.Tensor, top_p: torch.Tensor, candidates: tuple[int, ...] = TOP_P_CANDIDATES
) -> torch.Tensor:
    """TopPLogitsWarper: drop the tokens whose ascending cumulative probability is <= 1 - top_p,
    always keeping the most likely token. Rows with top_p >= 1 are left untouched (transformers
    skips the warper there; the cumulative sum could otherwise drop tokens whose probability
    underflows to 0). Pass top_p as float64 to round 1 - top_p as transformers' Python float does.

    Only each row's most likely tokens are sorted (a top-k of `candidates[0]`, then of the next size):
    every other token lies below them, so its ascending cumulative probability is at most the mass
    outside the candidates; when that mass is within 1 - top_p for every row, all of them go and the
    candidates decide alone. Otherwise (flat distributions) the whole vocabulary is sorted.
    Cumulative sums are taken in float64, as torch's float32 cumsum accumulates on the CPU."""
    vocab = logits.shape[-1]
    probs = None
    for k in candidates:
        if k >= vocab:
            break
        probs = logits.softmax(dim=-1) if probs is None else probs
        warped = _top_p_of_candidates(logits, probs, top_p, k)
        if warped is not None:
            return warped
    sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    cutoff = (1 - top_p).to(cumulative.dtype)[:, None]  # [rows, 1]
    remove_sorted = (cumulative <= cutoff) & (top_p < 1)[:, None]
    remove_sorted[:, -1] = False
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def _top_p_of_candidates(
    logits: torch.Tensor, probs: torch.Tensor, top_p: torch.Tensor, k: int
) -> torch.Tensor | None:
    """apply_top_p over the k most likely tokens of each row, None when some row needs more: mass
    it might keep outside the candidates, or a tie at its cut (equal logits on both sides, where the
    full sort's order of equal values decides which one goes)."""
    top_logits, top_idx = logits.topk(k, dim=-1)  # [rows, k], descending
    top_probs = probs.gather(1, top_idx)
    total = probs.sum(dim=-1, dtype=torch.float64)
    ascending = top_probs.flip(-1).to(torch.float64)
    tail = total - ascending.sum(dim=-1)  # [rows] the mass outside the candidates
    cutoff = (1 - top_p).to(logits.dtype)  # [rows]
    active = top_p < 1
    cumulative = (tail[:, None] + ascending.cumsum(dim=-1)).to(logits.dtype).flip(-1)  # [rows, k], descending
    keep = cumulative > cutoff[:, None]
    keep[:, 0] = True
    num_kept = keep.sum(dim=-1)  # [rows]; keep is a prefix: cumulative descends
    last_kept = top_logits.gather(1, (num_kept - 1)[:, None])[:, 0]
    first_gone = top_logits.gather(1, num_kept.clamp(max=k - 1)[:, None])[:, 0]
    unsure = (tail.to(logits.dtype) > cutoff) | (num_kept == k) | (last_kept == first_gone)
    if bool((unsure & active).any()):  # one check for the whole batch, not one per row
        return None
    kept = torch.full_like(logits, NEG_INF).scatter(1, top_idx, top_logits.masked_fill(~keep, NEG_INF))
    return torch.where(active[:, None], kept, logits)
