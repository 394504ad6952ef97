"""Checkpoint -> model on a device (L3)."""

from __future__ import annotations

import logging
import re

import torch
from torch import nn
from tqdm.auto import tqdm

from tokenloom.errors import ModelLoadError
from tokenloom.loading.checkpoint import Checkpoint
from tokenloom.models.base import CausalLM
from tokenloom.models.quantization import quantize_linears
from tokenloom.models.registry import model_class_for

logger = logging.getLogger(__name__)

# Checkpoint tensors that are safe to leave unread: buffers older transformers versions saved (GPT-2's
# causal mask, rotary inverse frequencies, which the model computes itself) and the vision tower of a
# multimodal checkpoint whose text backbone is built. Any other tensor the model has no parameter
# for is an error: dropping it silently (q/k/v biases under a config without attention_bias, say)
# would give a model that runs and answers wrongly.
_IGNORED_TENSORS = re.compile(
    r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$"
    r"|(^|\.)rotary_emb\.inv_freq$"
    r"|^(model\.)?(vision_tower|multi_modal_projector)\."
)


def is_ignored_tensor(name: str) -> bool:
    """Whether a checkpoint tensor the model has no parameter for may be skipped."""
    return _IGNORED_TENSORS.search(name) is not None


def build_model(
    checkpoint: Checkpoint,
    device: torch.device,
    dtype: torch.dtype,
    quantize_bits: int | None = None,
    progress: bool = False,
) -> CausalLM:
    """Instantiate the architecture named by the config and fill it with the checkpoint's tensors."""
    model_cls = model_class_for(checkpoint.config)
    config = model_cls.config_class.from_dict(checkpoint.config)  # type: ignore[attr-defined]
    with torch.device("meta"):
        model = model_cls(config)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    tensors = checkpoint.iter_tensors()
    if progress:
        tensors = tqdm(tensors, total=checkpoint.num_tensors, desc="Loading weights", unit="tensor")
    for name, tensor in tensors:
        if name not in params:
            if is_ignored_tensor(name):
                logger.debug("ignoring checkpoint tensor %s", name)
                continue
            raise ModelLoadError(
                f"{checkpoint.source.path} holds tensor {name} (shape {tuple(tensor.shape)}), which the "
                f"{config.model_type} model built from its config has no parameter for",
                hint="the config does not describe these weights (e.g. q/k/v biases in the checkpoint "
                "but no attention_bias=true in config.json); tokenloom does not drop weights silently",
            )
        expected = params[name].shape
        if tuple(tensor.shape) != tuple(expected):
            raise ModelLoadError(
                f"tensor {name} has shape {tuple(tensor.shape)} in {checkpoint.source.path}, "
                f"the model expects {tuple(expected)}"
            )
        _set_parameter(model, name, tensor.to(device=device, dtype=dtype))
        loaded.add(name)
    if config.tie_word_embeddings and "lm_head.weight" in params and "lm_head.weight" not in loaded:
        model.lm_head.weight = model.model.embed_tokens.weight  # type: ignore[union-attr]
        loaded.add("lm_head.weight")
    missing = sorted(set(params) - loaded)
    if missing:
        raise ModelLoadError(
            f"{checkpoint.source.path} lacks {len(missing)} weight(s) the model needs, e.g. {missing[:3]}"
        )
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                if buffer.is_meta:
                    raise ModelLoadError(f"buffer {name} of {type(module).__name__} was not initialised")
                module._buffers[name] = buffer.to(device)
    if quantize_bits is not None:
        quantize_linears(model, quantize_bits)
    return model.eval().requires_grad_(False)


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, attr, nn.Parameter(tensor, requires_grad=False))
