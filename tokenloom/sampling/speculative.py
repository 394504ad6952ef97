"""Verification of proposed tokens (L1t): exact match for greedy rows, rejection sampling for sampled
rows (Leviathan et al. 2023; Chen et al. 2023), so a sampled output follows the target model's
distribution whatever proposed the tokens.

Each speculating row brings k proposed tokens d_0..d_{k-1} and the processed scores of k + 1
positions: position j scores the token after the sequence plus d_0..d_{j-1}. The result is the longest
accepted prefix of the proposal plus one token of the target's own (the correction at the first
rejected position, or a bonus token after a fully accepted run): 1 to k + 1 tokens.
"""

from __future__ import annotations

import torch

from tokenloom.sampling.state import wide_float


def verify_greedy(argmax_ids: list[int], proposed: list[int]) -> list[int]:
    """argmax_ids: the target's choice at each of the k + 1 positions. The accepted run: the proposal
    while it agrees with the target, then the target's own token."""
    accepted = 0
    while accepted < len(proposed) and proposed[accepted] == argmax_ids[accepted]:
        accepted += 1
    return [*proposed[:accepted], argmax_ids[accepted]]


def verify_sampled(
    processed: torch.Tensor,
    proposed: list[int],
    draft_probs: torch.Tensor | None,
    generator: torch.Generator | None,
) -> list[int]:
    """Rejection sampling over one row. processed: [k + 1, vocab] target scores (every processor and
    warper applied); draft_probs: [k, vocab] the distributions the proposals were drawn from, None for
    a deterministic proposer (prompt lookup: a point mass on each proposed token). Draws k + 1
    uniforms from the row's generator: d_j is accepted with probability min(1, p_j(d_j) / q_j(d_j));
    at the first rejection a token is drawn from max(0, p_j - q_j) (normalised), after a full run
    from p_k."""
    k = len(proposed)
    device = processed.device
    dtype = wide_float(device)
    probs = processed.softmax(dim=-1).to(dtype)  # [k + 1, vocab]
    uniform = torch.rand((k + 1,), generator=generator, dtype=dtype, device=device)  # [k + 1]
    if k == 0:
        return [_draw(probs[0], uniform[0])]
    index = torch.tensor(proposed, dtype=torch.long, device=device)  # [k]
    positions = torch.arange(k, device=device)
    p_proposed = probs[positions, index]  # [k]
    if draft_probs is None:
        q_proposed = torch.ones_like(p_proposed)
    else:
        q = draft_probs.to(device=device, dtype=dtype)  # [k, vocab]
        q_proposed = q[positions, index]
    accepted_mask = (uniform[:k] * q_proposed < p_proposed).to(torch.long)
    accepted = int(accepted_mask.cumprod(dim=0).sum().item())  # the step's one sync
    if accepted == k:
        return [*proposed, _draw(probs[k], uniform[k])]
    p = probs[accepted]
    if draft_probs is None:
        residual = p.clone()
        residual[proposed[accepted]] = 0.0
    else:
        residual = (p - q[accepted]).clamp_min(0.0)
    # p == q leaves nothing (a rejection then has probability 0, but rounding can still land there)
    residual = torch.where(residual.sum() > 0, residual, p)
    return [*proposed[:accepted], _draw(residual, uniform[k])]


def _draw(weights: torch.Tensor, uniform: torch.Tensor) -> int:
    """The token whose cumulative weight first exceeds uniform * total (inverse CDF), weights [vocab]."""
    cdf = weights.cumsum(dim=-1)
    total = cdf[-1:]
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    return int(torch.searchsorted(cdf, target, right=True).clamp(max=weights.shape[-1] - 1).item())
