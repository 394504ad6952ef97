"""Model sources (L3): GGUF files, HF directories, hub ids and pull names -> model + tokenizer."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tokenloom.errors import ModelLoadError
from tokenloom.loading.checkpoint import Checkpoint, ModelSource, TokenizerData

if TYPE_CHECKING:  # torch is imported when a model is built, not when a tokenizer is loaded
    import torch

    from tokenloom.device import WeightPlan
    from tokenloom.kernels.policy import KernelPolicy
    from tokenloom.models.base import CausalLM

# The tokens of the load-time check: one forward pass over them must give finite logits.
_CHECK_TOKENS = (0, 1, 2)


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
    check_logits: bool = True,
) -> LoadedModel:
    """Resolve a path / pull name / hub id and build the model on the chosen device.

    dtype None / "auto": a GGUF's quantized matrices run on the int4/int8 kernels (see
    `tokenloom.device.resolve_weights`); an explicit dtype dequantizes everything to it (float32: the
    exact mode). quantize_bits 8 / 4: load_in_8bit / load_in_4bit. `kernels` overrides when the
    quantized kernels run and which dense copy is kept for wide calls.

    Every load error is a ModelLoadError naming the file; with `check_logits` (the default) one forward
    pass over a three-token input must give finite logits (NaN weights, or values that overflow, are
    refused here instead of generating token 0 forever)."""
    from tokenloom.device import resolve_device, resolve_weights
    from tokenloom.loading.build import build_model
    from tokenloom.loading.resolve import resolve_model

    start = time.perf_counter()
    source = resolve_model(name_or_path, gguf_file, revision=revision)
    checkpoint = load_checkpoint(source)
    device = resolve_device(device_map)
    config_dtype = checkpoint.config.get("torch_dtype") or checkpoint.config.get("dtype")
    plan = resolve_weights(dtype, device, config_dtype, quantize_bits, kernels)
    try:
        model = build_model(checkpoint, device, plan, progress=progress)
    except ModelLoadError as exc:
        if str(source.path) in str(exc):
            raise
        raise type(exc)(f"{source.path}: {exc}", hint=exc.hint) from exc
    if check_logits:
        check_finite_logits(model, source)
    return LoadedModel(model, checkpoint, device, plan.dtype, time.perf_counter() - start, plan)


def check_finite_logits(model: CausalLM, source: ModelSource) -> None:
    """One forward pass over a few tokens, through a one-block KV cache of its own: its logits must be
    finite. Raises ModelLoadError naming the file and the non-finite weights, if any."""
    import torch

    from tokenloom.attention.paged import AttentionMetadata
    from tokenloom.cache.kv_cache import KVCache
    from tokenloom.models.head import exact_heads
    from tokenloom.models.linear import GGUFEmbedding, QuantizedLinear

    config = model.config
    ids = [min(t, config.vocab_size - 1) for t in _CHECK_TOKENS]
    param = next(model.parameters())
    dtype = param.dtype if param.is_floating_point() else torch.float32
    block = len(ids)
    cache = KVCache(config.num_hidden_layers, 1, block, config.num_key_value_heads, config.head_dim, dtype,
                    param.device)
    meta = AttentionMetadata.build([len(ids)], [len(ids)], [[0]], block, param.device, input_ids=ids)
    # a shortlist head's kernel is left for its first use: here the head runs its dense weight, read
    # from the same stored blocks as the kernel's
    with torch.inference_mode(), exact_heads(model):
        logits = model.compute_logits(model(meta.input_ids, meta.positions, cache, meta))
        if bool(torch.isfinite(logits).all()):
            return
        bad = [name for name, p in model.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
        bad += [  # weights kept as quantized codes or GGUF blocks: their values as the kernels see them
            f"{name}.weight" for name, m in model.named_modules()
            if isinstance(m, (QuantizedLinear, GGUFEmbedding)) and not torch.isfinite(m.dequantized_weight()).all()
        ]  # fmt: skip
    weights = f"non-finite weights: {', '.join(bad[:4])}" if bad else (
        "the weights are finite, so config values (a norm epsilon, a rope base) or weights too large overflow"
    )
    raise ModelLoadError(
        f"{source.path}: the model's logits for a {len(ids)}-token input are not finite (NaN or inf); {weights}",
        hint="the checkpoint is damaged or its config does not fit its weights; use an unmodified copy",
    )


__all__ = [
    "Checkpoint",
    "check_finite_logits",
    "LoadedModel",
    "ModelSource",
    "TokenizerData",
    "load_checkpoint",
    "load_model",
    "load_tokenizer_data",
]
