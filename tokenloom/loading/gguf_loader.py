"""GGUF file -> Checkpoint: llama.cpp metadata mapped to config.json keys, tensors to HF names and layout.

The mapping follows transformers' own GGUF loader (`modeling_gguf_pytorch_utils`, `integrations/ggml`)
so that a config and state dict built here equal the ones transformers builds from the same file; the
tests check that against transformers itself.
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gguf.constants import GGMLQuantizationType

from tokenloom.errors import GGUFFormatError
from tokenloom.loading.checkpoint import Checkpoint, ModelSource
from tokenloom.loading.gguf_cache import parsed_gguf
from tokenloom.loading.gguf_config import SUPPORTED_ARCHITECTURES, gguf_config
from tokenloom.loading.gguf_quants import GGUFTensor, dequantize, supported_types
from tokenloom.loading.gguf_reader import GGUFFile, GGUFTensorInfo
from tokenloom.loading.gguf_rope import ROPE_FREQS, llama3_rope_from_freqs

# GGUF tensor names -> HF parameter names
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
_ARCH_BLOCK_NAMES: dict[str, dict[str, str]] = {
    "phi3": {**_BLOCK_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
    "gemma3": {
        **_BLOCK_NAMES,
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    "gpt2": {
        "attn_norm": "ln_1",
        "attn_qkv": "attn.c_attn",
        "attn_output": "attn.c_proj",
        "ffn_norm": "ln_2",
        "ffn_up": "mlp.c_fc",
        "ffn_down": "mlp.c_proj",
    },
}
_GPT2_GLOBAL_NAMES = {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
}
# GPT-2's Conv1D keeps weights as [in_features, out_features]; llama.cpp stores them transposed.
_GPT2_TRANSPOSED = ("attn_qkv", "attn_output", "ffn_up", "ffn_down")
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^(.+)\.(weight|bias)$")


def hf_tensor_name(gguf_name: str, architecture: str) -> str | None:
    """The HF parameter name of a GGUF tensor, or None when the architecture has no such parameter."""
    if match := _BLOCK_RE.match(gguf_name):
        layer, leaf, kind = match.groups()
        mapped = _ARCH_BLOCK_NAMES.get(architecture, _BLOCK_NAMES).get(leaf)
        if mapped is None:
            return None
        prefix = "transformer.h" if architecture == "gpt2" else "model.layers"
        return f"{prefix}.{layer}.{mapped}.{kind}"
    if match := _GLOBAL_RE.match(gguf_name):
        leaf, kind = match.groups()
        mapped = (_GPT2_GLOBAL_NAMES if architecture == "gpt2" else _GLOBAL_NAMES).get(leaf)
        return f"{mapped}.{kind}" if mapped else None
    return None


@dataclass(frozen=True)
class _TensorPlan:
    """What to do with one GGUF tensor on its way to the model."""

    name: str  # HF name (the GGUF name when the architecture has no such parameter)
    info: GGUFTensorInfo
    permute_heads: int = 0  # > 0: undo llama.cpp's rotary row permutation over this many heads
    subtract_one: bool = False  # gemma norms are stored as 1 + w
    transpose: bool = False  # gpt2 Conv1D weights


def _plan(gguf: GGUFFile, architecture: str, config: dict[str, Any]) -> list[_TensorPlan]:
    num_heads = config.get("num_attention_heads") or config.get("n_head") or 0
    num_kv_heads = config.get("num_key_value_heads") or num_heads
    supported = set(supported_types())
    plans = []
    for info in gguf.tensors:
        if info.type_name not in supported:
            raise GGUFFormatError(
                f"{gguf.path}: tensor {info.name!r} has type {info.type_name}, which cannot be dequantized",
                hint=f"supported tensor types: {', '.join(sorted(supported))}",
            )
        permute_heads = 0
        if architecture == "llama" and ".attn_q." in info.name:
            permute_heads = num_heads
        elif architecture == "llama" and ".attn_k." in info.name:
            permute_heads = num_kv_heads
        plans.append(
            _TensorPlan(
                name=hf_tensor_name(info.name, architecture) or info.name,
                info=info,
                permute_heads=permute_heads,
                subtract_one=architecture == "gemma3" and "norm.weight" in info.name,
                transpose=architecture == "gpt2"
                and info.name.endswith(".weight")
                and info.name.split(".")[-2] in _GPT2_TRANSPOSED,
            )
        )
    return plans


def _unpermute_rows(rows: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's `permute` of Q/K rows (transformers' `_reverse_permute_weights`).

    Rows are whole quantization blocks, so this works on raw block bytes as well as on floats."""
    head_dim_half = rows.shape[0] // num_heads // 2
    trailing = rows.shape[1:]
    return rows.reshape(num_heads, head_dim_half, 2, *trailing).transpose(1, 2).reshape(rows.shape)


def _materialize(gguf: GGUFFile, plan: _TensorPlan) -> torch.Tensor:
    info = plan.info
    raw = torch.from_numpy(gguf.raw(info))
    permute_raw = plan.permute_heads > 0 and len(info.shape) >= 2
    if permute_raw:
        raw = _unpermute_rows(raw.reshape(info.shape[0], -1), plan.permute_heads)
    tensor = dequantize(raw, info.ggml_type, info.shape)
    if plan.permute_heads > 0 and not permute_raw:
        tensor = _unpermute_rows(tensor, plan.permute_heads)
    if plan.subtract_one:
        tensor = tensor - 1.0
    if plan.transpose:
        tensor = tensor.t().contiguous()
    return tensor


_FLOAT_VIEWS = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}


def _stored(gguf: GGUFFile, plan: _TensorPlan) -> torch.Tensor | GGUFTensor:
    """One tensor as the model builder takes it: quantized matrices stay blocks (`GGUFTensor`, rows
    un-permuted for Q/K), float matrices are views of the file map; vectors and tensors that need
    arithmetic (gemma's norms, gpt2's transposed Conv1D weights) are dequantized to float32."""
    info = plan.info
    if len(info.shape) != 2 or plan.subtract_one or plan.transpose:
        return _materialize(gguf, plan)
    rows = torch.from_numpy(gguf.raw(info)).view(info.shape[0], -1)
    if plan.permute_heads > 0:
        rows = _unpermute_rows(rows, plan.permute_heads)
    float_dtype = _FLOAT_VIEWS.get(GGMLQuantizationType(info.ggml_type))
    if float_dtype is not None:
        return rows.view(float_dtype)
    return GGUFTensor(rows, info.ggml_type, (int(info.shape[0]), int(info.shape[1])))


def _default_workers() -> int:
    return max(
        1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    )


def _iter_tensors(
    gguf: GGUFFile, plans: list[_TensorPlan], workers: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors in file order, dequantized by `workers` threads that each run torch single-threaded.

    Whole tensors per thread rather than torch's intra-op threads: with few cores (and neighbours
    using them), every parallel op on a small tensor waits at a thread barrier, which made loading
    SmolLM2 take 10-20 s instead of well under one.
    """
    pending: deque[tuple[str, Future[torch.Tensor]]] = deque()
    # A worker's set_num_threads also becomes the default of threads started later in the process:
    # the caller's count is put back once the pool is done.
    num_threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(
            max(1, workers), thread_name_prefix="gguf-dequant", initializer=torch.set_num_threads, initargs=(1,)
        ) as pool:
            try:
                for plan in plans:
                    pending.append((plan.name, pool.submit(_materialize, gguf, plan)))
                    if len(pending) > 2 * workers:
                        name, future = pending.popleft()
                        yield name, future.result()
                while pending:
                    name, future = pending.popleft()
                    yield name, future.result()
            finally:
                for _, future in pending:
                    future.cancel()
    finally:
        torch.set_num_threads(num_threads)


def load_gguf_checkpoint(path: Path, *, num_workers: int | None = None) -> Checkpoint:
    """Read a GGUF file's config and its tensors lazily, under HF names and in HF layout: dequantized
    to float32 (`iter_tensors`) or as stored (`iter_stored`: quantized blocks kept, see `_stored`).
    The header is parsed once per file (`parsed_gguf`), shared with the tokenizer loader.

    Raises ModelNotFoundError for a missing file, GGUFFormatError for a malformed or truncated one
    or an unsupported tensor type, UnsupportedModelError for an architecture not mapped here.
    """
    path = Path(path)
    gguf = parsed_gguf(path)
    architecture = gguf.metadata.get("general.architecture")
    config = gguf_config(gguf.metadata, [info.name for info in gguf.tensors], path)
    generation_config = {
        key: config[key]
        for key in ("bos_token_id", "eos_token_id", "pad_token_id")
        if config.get(key) is not None
    }
    if config["model_type"] in ("llama", "mistral"):
        llama3_rope_from_freqs(gguf, config)  # refuses a rope_freqs tensor it cannot account for
    plans = [plan for plan in _plan(gguf, str(architecture), config) if plan.info.name != ROPE_FREQS]
    workers = _default_workers() if num_workers is None else num_workers

    def iter_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        return _iter_tensors(gguf, plans, workers)

    def iter_stored() -> Iterator[tuple[str, torch.Tensor | GGUFTensor]]:
        return ((plan.name, _stored(gguf, plan)) for plan in plans)

    return Checkpoint(
        source=ModelSource(kind="gguf", path=path),
        config=config,
        generation_config=generation_config,
        iter_tensors=iter_tensors,
        num_tensors=len(plans),
        iter_stored=iter_stored,
    )


__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "gguf_config",
    "hf_tensor_name",
    "load_gguf_checkpoint",
]
