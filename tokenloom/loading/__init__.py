"""Model sources (L3): GGUF files, HF directories, hub ids and pull names -> model + tokenizer."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tokenloom.loading.checkpoint import Checkpoint, ModelSource, TokenizerData

if TYPE_CHECKING:  # torch is imported when a model is built, not when a tokenizer is loaded
    import torch

    from tokenloom.device import WeightPlan
    from tokenloom.kernels.policy import KernelPolicy
    from tokenloom.models.base import CausalLM


def load_checkpoint(source: ModelSource) -> Checkpoint:
    """Read config and (lazily) weights from a resolved source."""
    if source.kind == "gguf":
        from tokenloom.loading.gguf_loader import load_gguf_checkpoint

        return load_gguf_checkpoint(source.path)
    from tokenloom.loading.hf_loader import load_hf_checkpoint

    return load_hf_checkpoint(source.path)


def load_tokenizer_data(source: ModelSource) -> TokenizerData:
    if source.kind == "gguf":
        from tokenloom.loading.gguf_tokenizer import load_gguf_tokenizer

        return load_gguf_tokenizer(source.path)
    from tokenloom.loading.hf_tokenizer import load_hf_tokenizer

    return load_hf_tokenizer(source.path)


@dataclass
class LoadedModel:
    model: CausalLM
    checkpoint: Checkpoint
    device: torch.device
    dtype: torch.dtype  # of activations, norms and the KV cache
    load_seconds: float
    weights: WeightPlan | None = None  # how the weights are held (quantized kernels or dense)


def load_model(
    name_or_path: str | os.PathLike[str],
    gguf_file: str | None = None,
    *,
    device_map: object = "auto",
    dtype: object = None,
    quantize_bits: int | None = None,
    revision: str | None = None,
    progress: bool = False,
    kernels: KernelPolicy | None = None,
) -> LoadedModel:
    """Resolve a path / pull name / hub id and build the model on the chosen device.

    dtype None / "auto": a GGUF's quantized matrices run on the int4/int8 kernels (see
    `tokenloom.device.resolve_weights`); an explicit dtype dequantizes everything to it (float32: the
    exact mode). quantize_bits 8 / 4: load_in_8bit / load_in_4bit. `kernels` overrides when the
    quantized kernels run and which dense copy is kept for wide calls."""
    from tokenloom.device import resolve_device, resolve_weights
    from tokenloom.loading.build import build_model
    from tokenloom.loading.resolve import resolve_model

    start = time.perf_counter()
    source = resolve_model(name_or_path, gguf_file, revision=revision)
    checkpoint = load_checkpoint(source)
    device = resolve_device(device_map)
    config_dtype = checkpoint.config.get("torch_dtype") or checkpoint.config.get("dtype")
    plan = resolve_weights(dtype, device, config_dtype, quantize_bits, kernels)
    model = build_model(checkpoint, device, plan, progress=progress)
    return LoadedModel(model, checkpoint, device, plan.dtype, time.perf_counter() - start, plan)


__all__ = [
    "Checkpoint",
    "LoadedModel",
    "ModelSource",
    "TokenizerData",
    "load_checkpoint",
    "load_model",
    "load_tokenizer_data",
]
