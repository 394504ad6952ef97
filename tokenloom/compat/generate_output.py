"""What compat generate() returns with return_dict_in_generate=True, in transformers' shape (L6)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RowResult:
    """One generated sequence: new token ids, why it ended, per-step scores/logits rows ([vocab] each,
    when asked for) and, for beam search, the hypothesis score."""

    token_ids: list[int]
    finish_reason: str | None = None
    scores: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    score: float | None = None


class GenerateOutput(dict):
    """transformers' GenerateDecoderOnlyOutput / GenerateBeamDecoderOnlyOutput: `out.sequences`,
    `out["scores"]`, `out[0]`. Fields left at None are not keys, as in transformers' ModelOutput."""

    FIELDS = ("sequences", "sequences_scores", "scores", "logits")

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
