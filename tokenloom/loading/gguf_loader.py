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

from tokenloom.errors import GGUFFormatError, UnsupportedModelError
from tokenloom.loading.checkpoint import Checkpoint, ModelSource
from tokenloom.loading.gguf_quants import dequantize, supported_types
from tokenloom.loading.gguf_reader import GGUFFile, GGUFTensorInfo, read_gguf

# llama.cpp key (after "<arch>.") -> config.json key; transformers' GGUF_CONFIG_MAPPING for these archs.
_DECODER_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
_ARCH_KEYS: dict[str, dict[str, str]] = {
    # rope.dimension_count is head_dim only for llama/mistral (transformers' note)
    "llama": {**_DECODER_KEYS, "rope.dimension_count": "head_dim"},
    "mistral": {**_DECODER_KEYS, "rope.dimension_count": "head_dim"},
    "qwen2": _DECODER_KEYS,
    "qwen3": _DECODER_KEYS,
    "phi3": _DECODER_KEYS,
    "gemma3": {
        **_DECODER_KEYS,
        "attention.key_length": "head_dim",
        "attention.sliding_window": "sliding_window",
    },
    "gpt2": {
        "block_count": "n_layer",
        "context_length": "n_ctx",
        "embedding_length": "n_embd",
        "feed_forward_length": "feed_forward_length",
        "attention.head_count": "n_head",
        "attention.layer_norm_epsilon": "layer_norm_epsilon",
    },
}
_GENERAL_KEYS = {"general.architecture": "model_type", "general.name": "_model_name_or_path"}
_TOKEN_ID_KEYS = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}
# Keys transformers leaves to its config classes' defaults but the file states: kept, as they describe
# this model rather than the class's reference checkpoint.
_EXTRA_KEYS: dict[str, dict[str, str]] = {
    "qwen3": {"attention.key_length": "head_dim"},
    "phi3": {"attention.sliding_window": "sliding_window"},
}
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3", "phi3", "gpt2")


def gguf_config(metadata: dict[str, Any], tensor_names: list[str], path: Path) -> dict[str, Any]:
    """config.json keys for a GGUF file's metadata, as transformers' GGUF loader derives them."""
    architecture = metadata.get("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {architecture!r} is not supported",
            hint=f"supported GGUF architectures: {', '.join(SUPPORTED_ARCHITECTURES)}",
        )
    # transformers' test is list membership on the parsed name, so only a name of exactly "mistral" counts
    updated = (
        "mistral" if architecture == "llama" and metadata.get("general.name") == "mistral" else architecture
    )
    arch_keys = {f"{architecture}.{key}": name for key, name in _ARCH_KEYS[updated].items()}
    extra_keys = {f"{architecture}.{key}": name for key, name in _EXTRA_KEYS.get(updated, {}).items()}

    config: dict[str, Any] = {"tie_word_embeddings": "output.weight" not in tensor_names}
    for key, value in metadata.items():
        name = _GENERAL_KEYS.get(key) or _TOKEN_ID_KEYS.get(key) or arch_keys.get(key) or extra_keys.get(key)
        if name is None:
            continue
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, str) and architecture in value:
            value = value.replace(architecture, updated)
        config[name] = value
    if config["model_type"] == "gemma3":  # the GGUF holds the text backbone only
        config["model_type"] = "gemma3_text"
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in metadata:
        config["vocab_size"] = len(metadata["tokenizer.ggml.tokens"])

    config["torch_dtype"] = "float32"
    if any(name.endswith(".attn_q.bias") for name in tensor_names) and updated in ("llama", "mistral"):
        config["attention_bias"] = True
    if "rope_theta" in config and updated != "gemma3":
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_theta"]}
    if updated == "gemma3":
        _add_gemma3_defaults(config)
    if updated == "gpt2":
        config.setdefault("n_positions", config.get("n_ctx"))
        config.setdefault("n_inner", config.get("feed_forward_length"))
    return config


def _add_gemma3_defaults(config: dict[str, Any]) -> None:
    """What Gemma3TextConfig supplies and a GGUF does not state (the values of every Gemma 3 release)."""
    config.setdefault("rope_theta", 1_000_000.0)
    config.setdefault("rope_local_base_freq", 10_000.0)
    config.setdefault("sliding_window_pattern", 6)
    config.setdefault("query_pre_attn_scalar", 256)
    config.setdefault("hidden_activation", "gelu_pytorch_tanh")
    config.setdefault("final_logit_softcapping", None)
    config.setdefault("attn_logit_softcapping", None)
    pattern = config["sliding_window_pattern"]
    config.setdefault(
        "layer_types",
        [
            "sliding_attention" if (i + 1) % pattern else "full_attention"
            for i in range(config.get("num_hidden_layers", 0))
        ],
    )
    config["rope_parameters"] = {
        "sliding_attention": {"rope_type": "default", "rope_theta": config["rope_local_base_freq"]},
        "full_attention": {"rope_type": "default", "rope_theta": config["rope_theta"]},
    }


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
    """Read a GGUF file's config and lazily dequantized tensors (float32, HF names and layout).

    Raises ModelNotFoundError for a missing file, GGUFFormatError for a malformed or truncated one
    or an unsupported tensor type, UnsupportedModelError for an architecture not mapped here.
    """
    path = Path(path)
    gguf = read_gguf(path)
    architecture = gguf.metadata.get("general.architecture")
    config = gguf_config(gguf.metadata, [info.name for info in gguf.tensors], path)
    generation_config = {
        key: config[key]
        for key in ("bos_token_id", "eos_token_id", "pad_token_id")
        if config.get(key) is not None
    }
    plans = _plan(gguf, str(architecture), config)
    workers = _default_workers() if num_workers is None else num_workers

    def iter_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        return _iter_tensors(gguf, plans, workers)

    return Checkpoint(
        source=ModelSource(kind="gguf", path=path),
        config=config,
        generation_config=generation_config,
        iter_tensors=iter_tensors,
        num_tensors=len(plans),
    )


__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "gguf_config",
    "hf_tensor_name",
    "load_gguf_checkpoint",
]
