"""Padding for the compat face: rows stripped of it with the attention mask before the engine sees
them, and generated rows padded back the way transformers lays them out."""

from __future__ import annotations

import torch

from tokenloom.compat.generation_config import GenerationConfig


def infer_attention_mask(input_ids: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """As transformers: pad tokens are masked when a pad id is set, present and not an EOS id."""
    pad = config.pad_token_id
    if pad is not None and pad not in config.eos_token_ids and bool((input_ids == pad).any()):
        return (input_ids != pad).long()
    return torch.ones_like(input_ids)


def strip_padding(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Per row: the unmasked token ids and their column positions."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
    ids = input_ids.detach().cpu()
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.detach().cpu().bool()
    if mask.shape != ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(mask.shape)} does not match input_ids shape {tuple(ids.shape)}"
        )
    rows, positions = [], []
    for i in range(ids.shape[0]):
        pos = mask[i].nonzero().flatten()
        if pos.numel() == 0:
            raise ValueError(f"row {i} of the batch has no tokens (its attention_mask is all zeros)")
        rows.append(ids[i, pos].tolist())
        positions.append(pos)
    return rows, positions


def repad(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, generated: list[list[int]], pad_token_id: int | None
) -> torch.Tensor:
    """Left-padded (and unpadded) rows keep their layout with new tokens appended at the input width;
    a right-padded row becomes prompt + new tokens followed by padding."""
    batch, width = input_ids.shape
    longest = max((len(g) for g in generated), default=0)
    pad = pad_token_id if pad_token_id is not None else 0
    out = torch.full((batch, width + longest), pad, dtype=input_ids.dtype)
    ids = input_ids.detach().cpu()
    mask = attention_mask.detach().cpu().bool()
    for i, new in enumerate(generated):
        pos = mask[i].nonzero().flatten()
        leading = int(pos[0])  # left padding stays; any padding after the prompt moves to the end
        real = ids[i, pos]
        out[i, :leading] = ids[i, :leading]
        out[i, leading : leading + len(real)] = real
        start = leading + len(real)
        out[i, start : start + len(new)] = torch.tensor(new, dtype=input_ids.dtype)
    return out.to(input_ids.device)
