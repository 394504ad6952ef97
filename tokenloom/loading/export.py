"""Weights in Hugging Face layout, for writing a checkpoint (L3).

`hf_state_dict(model)` gives every weight of a tokenloom model under transformers' parameter name, dense,
in transformers' layout: fused projections are split back into the checkpoint's tensors (qkv_proj ->
q_proj, k_proj, v_proj; gate_up_proj -> gate_proj, up_proj, by the model class's
`packed_modules_mapping`), quantized weights are dequantized to the values their kernel computes with,
and embeddings kept as GGUF blocks are dequantized. Everything comes out in the model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenloom.models.linear import EMBEDDING_FORMATS, LINEAR_FORMATS


def _model_dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _bias(module: nn.Module) -> torch.Tensor | None:
    if hasattr(module, "parts"):  # ConcatLinear
        biases = [_bias(part) for part in module.parts]
        if all(b is None for b in biases):
            return None
        return torch.cat([b if b is not None else torch.zeros(p.out_features, dtype=torch.float32)
                          for b, p in zip(biases, module.parts)])  # fmt: skip
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach()


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """HF-named dense tensors of `model` (a tied weight appears under each of its names, as the same
    tensor)."""
    dtype = _model_dtype(model)
    unpacked: dict[str, dict[int, str]] = {}
    for name, (fused, index) in getattr(type(model), "packed_modules_mapping", {}).items():
        unpacked.setdefault(fused, {})[index] = name
    state: dict[str, torch.Tensor] = {}
    covered: set[str] = set()
    def inside_covered(name: str) -> bool:
        return any(name == c or name.startswith(c + ".") for c in covered)

    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if inside_covered(module_name):  # a part of a ConcatLinear: exported with its whole
            continue
        if isinstance(module, EMBEDDING_FORMATS):
            state[prefix + "weight"] = module.dequantized_weight().to(dtype)
            covered.add(module_name)
        elif isinstance(module, LINEAR_FORMATS):
            covered.add(module_name)
            weight = module.dequantized_weight().to(dtype)
            bias = _bias(module)
            parent, _, leaf = module_name.rpartition(".")
            names = unpacked.get(leaf)
            if names is None:
                state[prefix + "weight"] = weight
                if bias is not None:
                    state[prefix + "bias"] = bias.to(dtype)
                continue
            head = f"{parent}." if parent else ""
            sizes = module.output_sizes
            for index, block in enumerate(weight.split(sizes)):
                state[f"{head}{names[index]}.weight"] = block
            if bias is not None:
                for index, block in enumerate(bias.to(dtype).split(sizes)):
                    state[f"{head}{names[index]}.bias"] = block
    for name, param in model.named_parameters(remove_duplicate=False):
        if not inside_covered(name.rpartition(".")[0]):
            state[name] = param.detach()
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False) and "model.embed_tokens.weight" in state:
        if getattr(model, "lm_head", None) is not None:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state
