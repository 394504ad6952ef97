"""Weights in Hugging Face layout, for writing a checkpoint (L3).

`hf_state_dict(model)` gives every weight of a tokenloom model under transformers' parameter name,
dense, in transformers' layout. Here the model's parameters already are that (its modules carry the
HF names); weights held in another form (quantized buffers) are refused rather than written wrongly.
"""

from __future__ import annotations

import torch
from torch import nn


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """HF-named dense tensors of `model` (a tied weight appears under each of its names)."""
    params = {name: p.detach() for name, p in model.named_parameters(remove_duplicate=False)}
    other = sorted(set(model.state_dict()) - set(params))
    if other:
        raise NotImplementedError(
            f"cannot export weights held as {', '.join(other[:3])}{', ...' if len(other) > 3 else ''} "
            "(quantized with load_in_8bit / load_in_4bit?); load the model without quantization to save it"
        )
    return params
