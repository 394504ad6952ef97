"""transformers' parameter names for a model whose decode-step projections are fused (L6).

The engine's layers hold q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj` (one matmul each
per step); a transformers user expects `q_proj.weight`, `k_proj.weight`, ... from `named_parameters()`
and `state_dict()`. Here a dense fused weight is shown as its row blocks under the checkpoint's names:
views of the fused tensor (no copy, the same values), so `state_dict()` equals transformers'.
Quantized weights keep their own buffers and names (they have no dense rows to show).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from tokenloom.models.linear import Linear


def unpacked_names(model: nn.Module) -> dict[str, dict[int, str]]:
    """fused module name -> {row block index: checkpoint module name}, from `packed_modules_mapping`."""
    unpacked: dict[str, dict[int, str]] = {}
    for name, (fused, index) in getattr(type(model), "packed_modules_mapping", {}).items():
        unpacked.setdefault(fused, {})[index] = name
    return unpacked


def _split(module: nn.Module, leaf: str, unpacked: dict[str, dict[int, str]]) -> dict[int, str] | None:
    names = unpacked.get(leaf)
    if names is None or not isinstance(module, Linear) or len(module.output_sizes) != len(names):
        return None
    return names


def hf_named_tensors(
    root: nn.Module, model: nn.Module, tensors: Iterator[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """`tensors` (named as in `root`'s tree) with each dense fused weight / bias replaced by its row
    blocks under the checkpoint's names; `model` is the CausalLM whose class carries the mapping."""
    unpacked = unpacked_names(model)
    modules = dict(root.named_modules(remove_duplicate=False)) if unpacked else {}
    for name, tensor in tensors:
        owner, _, kind = name.rpartition(".")
        parent, _, leaf = owner.rpartition(".")
        module = modules.get(owner)
        names = _split(module, leaf, unpacked) if module is not None else None
        if names is None or kind not in ("weight", "bias"):
            yield name, tensor
            continue
        head = f"{parent}." if parent else ""
        for index, block in enumerate(tensor.split(module.output_sizes)):
            if isinstance(tensor, nn.Parameter):
                block = nn.Parameter(block, requires_grad=tensor.requires_grad)  # a view: same storage
            yield f"{head}{names[index]}.{kind}", block


def fused_state_dict(root: nn.Module, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `hf_named_tensors` for loading: checkpoint-named row blocks of a dense fused
    projection joined back under the fused name (the blocks must all be there; otherwise the names
    are left as they are, for load_state_dict to report)."""
    unpacked = unpacked_names(model)
    if not unpacked:
        return state
    out = dict(state)
    for owner, module in root.named_modules():
        parent, _, leaf = owner.rpartition(".")
        names = _split(module, leaf, unpacked)
        if names is None:
            continue
        head = f"{parent}." if parent else ""
        for kind in ("weight", "bias"):
            parts = [f"{head}{names[i]}.{kind}" for i in range(len(names))]
            if all(part in out for part in parts):
                out[f"{owner}.{kind}"] = torch.cat([out.pop(part) for part in parts], dim=0)
    return out
