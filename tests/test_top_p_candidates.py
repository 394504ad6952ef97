"""Top-p over each row's most likely tokens (a top-k instead of a sort of the vocabulary) keeps
exactly the tokens transformers' TopPLogitsWarper keeps, and falls back to the full sort where the
candidates cannot decide (a flat row, a tie at the cut)."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from tokenloom.sampling.top_p import _top_p_of_candidates, apply_top_p

VOCAB = 49152  # SmolLM2's
TOP_PS = [0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0, 0.7]


def _peaked(rows: int, seed: int, ties: bool = False) -> torch.Tensor:
    """Language-model-like rows: a long flat tail and a few dozen likely tokens."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, VOCAB, generator=g)
    head = torch.randint(0, VOCAB, (rows, 40), generator=g)
    logits.scatter_(1, head, 14 + 4 * torch.rand(rows, 40, generator=g))
    if ties:
        logits = torch.round(logits * 2) / 2
    return logits


def _transformers(logits: torch.Tensor, top_ps: list[float]) -> torch.Tensor:
    return torch.cat([
        TopPLogitsWarper(top_p=p)(None, logits[row : row + 1].clone()) if p < 1 else logits[row : row + 1]
        for row, p in enumerate(top_ps)
    ])


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_candidates_keep_what_transformers_keeps(seed, ties):
    logits = _peaked(len(TOP_PS), seed, ties)
    top_p = torch.tensor(TOP_PS, dtype=torch.float64)
    ours = apply_top_p(logits.clone(), top_p)
    expected = _transformers(logits, TOP_PS)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    assert torch.equal(ours[~torch.isinf(ours)], expected[~torch.isinf(expected)])
    if not ties:  # peaked rows: the 256 candidates decided, no sort of the vocabulary
        assert _top_p_of_candidates(logits, logits.softmax(-1), top_p, 256) is not None


def test_flat_rows_fall_back_to_the_full_sort():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(4))  # the mass is spread out
    top_p = torch.tensor([0.9, 0.5, 0.95], dtype=torch.float64)
    assert _top_p_of_candidates(logits, logits.softmax(-1), top_p, 256) is None
    ours = apply_top_p(logits.clone(), top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(_transformers(logits, [0.9, 0.5, 0.95])))


def test_a_tie_at_the_cut_is_left_to_the_full_sort():
    logits = torch.full((1, VOCAB), -20.0)
    logits[0, :4] = torch.tensor([5.0, 3.0, 3.0, 1.0])  # the cut of top_p 0.9 falls between the two 3.0s
    probs = logits.softmax(-1)
    top_p = torch.tensor([float(probs[0, 0] + probs[0, 1]) * 0.999], dtype=torch.float64)
    assert _top_p_of_candidates(logits, probs, top_p, 256) is None
