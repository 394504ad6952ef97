"""What generate() and forward() accept as token ids and attention masks (L6).

As in transformers: a tensor of integer token ids [batch, seq_len] (or [seq_len] for one row) and an
optional mask of the same shape holding 0/1 (integers, booleans or floats). Plain Python lists of ints,
or rectangular lists of lists, are taken as well (as transformers' tokenizers return them) and become
long tensors. Anything else is a TypeError / ValueError naming the argument and the value: a float
tensor would otherwise be truncated to ids silently, a bool tensor read as ids 0 and 1.
"""

from __future__ import annotations

from typing import Any

import torch

_MAX_TOKEN_ID = 2**63 - 1


def _from_list(value: list | tuple, name: str) -> torch.Tensor:
    if not value:
        raise ValueError(f"{name} is empty; give at least one token id")
    rows = value if isinstance(value[0], (list, tuple)) else [value]
    if any(not isinstance(row, (list, tuple)) for row in rows):
        raise TypeError(f"{name} mixes token ids and rows: give a list of ints or a list of lists of ints")
    for r, row in enumerate(rows):
        for i, token in enumerate(row):
            if isinstance(token, bool) or not isinstance(token, int):
                where = f"{name}[{r}][{i}]" if rows is value else f"{name}[{i}]"
                raise TypeError(f"{where} must be an integer token id, got {token!r} ({type(token).__name__})")
    lengths = {len(row) for row in rows}
    if len(lengths) > 1:
        raise ValueError(
            f"the rows of {name} have different lengths {sorted(lengths)}: pad them to one length and pass an "
            "attention_mask (a tokenizer called with padding=True does both)"
        )
    if any(not -_MAX_TOKEN_ID <= token <= _MAX_TOKEN_ID for row in rows for token in row):
        raise ValueError(f"{name} holds an id that does not fit in 64 bits")
    return torch.tensor(rows, dtype=torch.long)


def as_input_ids(value: Any, name: str = "input_ids") -> torch.Tensor:
    """Token ids as a 2-D integer tensor [batch, seq_len] (its own dtype and device when a tensor)."""
    if value is None:
        raise ValueError(f"{name} is required: a [batch, seq_len] tensor (or list) of token ids")
    if isinstance(value, (list, tuple)):
        value = _from_list(value, name)
    elif type(value).__module__ == "numpy" and hasattr(value, "dtype"):
        import numpy as np

        if not np.issubdtype(value.dtype, np.integer):
            raise TypeError(f"{name} must hold integer token ids, got a numpy array of {value.dtype}")
        value = torch.from_numpy(np.ascontiguousarray(value))
    elif not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{name} must be a tensor of token ids (or a list of ints / of lists of ints), got {type(value).__name__}"
        )
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        raise TypeError(
            f"{name} must hold integer token ids, got a {str(value.dtype).replace('torch.', '')} tensor; "
            "convert it with .long() only if it really holds ids"
        )
    if value.dim() == 1:
        value = value[None, :]
    if value.dim() != 2:
        raise ValueError(f"{name} must be [batch, seq_len] (or [seq_len]), got shape {tuple(value.shape)}")
    if value.shape[0] and not value.shape[1]:  # an empty batch (no rows) gives an empty result
        raise ValueError(f"{name} has no tokens (shape {tuple(value.shape)})")
    if value.numel() and bool((value < 0).any()):
        raise ValueError(f"{name} must hold token ids >= 0, got {int(value.min())}")
    return value


def as_attention_mask(value: Any, input_ids: torch.Tensor, name: str = "attention_mask") -> torch.Tensor | None:
    """The mask as a tensor of input_ids' shape holding only 0 and 1, or None."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = torch.tensor(value) if value else torch.empty(0)
    elif type(value).__module__ == "numpy" and hasattr(value, "dtype"):
        import numpy as np

        if not (np.issubdtype(value.dtype, np.number) or np.issubdtype(value.dtype, np.bool_)):
            raise TypeError(f"{name} must hold 0/1 values, got a numpy array of {value.dtype}")
        value = torch.from_numpy(np.ascontiguousarray(value))
    elif not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor (or list) of 0/1 values, got {type(value).__name__}")
    if value.is_complex():
        raise TypeError(f"{name} must hold 0/1 values, got a complex tensor")
    if value.dim() == 1 and input_ids.shape[0] == 1:
        value = value[None, :]
    if tuple(value.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"{name} shape {tuple(value.shape)} does not match input_ids shape {tuple(input_ids.shape)}"
        )
    if value.dtype != torch.bool and not bool(((value == 0) | (value == 1)).all()):
        odd = value[(value != 0) & (value != 1)]
        raise ValueError(f"{name} must hold only 0 and 1, got {odd.flatten()[0].item()!r}")
    return value


def check_inputs(input_ids: Any, attention_mask: Any = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids, attention_mask) as generate() and forward() use them; TypeError / ValueError otherwise."""
    ids = as_input_ids(input_ids)
    return ids, as_attention_mask(attention_mask, ids)
