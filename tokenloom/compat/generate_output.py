"""What compat generate() returns with return_dict_in_generate=True, in transformers' shape (L6)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RowResult:
    """One generated sequence: new token ids, why it ended, per-step scores/logits rows ([vocab] each,
    when asked for) and, for beam search, the hypothesis score, the beam each token extended and the
    per-step scores/logits of all its prompt's beams ([num_beams, vocab] each, when asked for)."""

    token_ids: list[int]
    finish_reason: str | None = None
    scores: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    score: float | None = None
    beam_indices: list[int] | None = None
    beam_scores: list[torch.Tensor] | None = None
    beam_logits: list[torch.Tensor] | None = None


class GenerateOutput(dict):
    """transformers' GenerateDecoderOnlyOutput / GenerateBeamDecoderOnlyOutput: `out.sequences`,
    `out["scores"]`, `out[0]`. Fields left at None are not keys, as in transformers' ModelOutput
    (sequences_scores only with output_scores, beam_indices always with beams, as there)."""

    FIELDS = ("sequences", "sequences_scores", "scores", "logits", "beam_indices")

    def __init__(self, **values: Any) -> None:
        unknown = set(values) - set(self.FIELDS)
        if unknown:
            raise TypeError(f"GenerateOutput got unknown field(s) {sorted(unknown)}")
        super().__init__((k, values[k]) for k in self.FIELDS if values.get(k) is not None)

    def __getattr__(self, name: str) -> Any:
        if name in self.FIELDS:
            return self.get(name)
        raise AttributeError(f"GenerateOutput has no attribute {name!r}")

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self.values())


def per_step(rows: list[list[torch.Tensor]], vocab: int) -> tuple[torch.Tensor, ...]:
    """transformers' layout: one [batch, vocab] float32 tensor per step. A row that finished earlier holds
    zeros at later steps (transformers computes scores there that it then throws away)."""
    steps = max((len(r) for r in rows), default=0)
    zeros = torch.zeros(vocab)
    return tuple(
        torch.stack([r[t].float().cpu() if t < len(r) else zeros for r in rows]) for t in range(steps)
    )


def per_beam_step(per_prompt: list[list[torch.Tensor]], num_beams: int, vocab: int) -> tuple[torch.Tensor, ...]:
    """Beam search's layout: one [batch * num_beams, vocab] float32 tensor per step, from each prompt's
    per-step [num_beams, vocab] tensors. A prompt whose search ended earlier holds zeros at later steps
    (transformers runs its beams on with the batch and records scores there that it then throws away;
    tokenloom drops the prompt, as it zero-fills finished rows without beams)."""
    steps = max((len(p) for p in per_prompt), default=0)
    zeros = torch.zeros(num_beams, vocab)
    return tuple(
        torch.cat([p[t].float().cpu() if t < len(p) else zeros for p in per_prompt]) for t in range(steps)
    )


def beam_indices_tensor(per_row: list[list[int]]) -> torch.Tensor:
    """transformers' beam_indices: [rows, longest generation] int32, -1 past each row's end."""
    width = max((len(r) for r in per_row), default=0)
    out = torch.full((len(per_row), width), -1, dtype=torch.int32)
    for i, row in enumerate(per_row):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
    return out
