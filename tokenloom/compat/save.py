"""`model.save_pretrained(directory)`: config.json, safetensors weights and generation_config.json, a
directory transformers' and tokenloom's from_pretrained both load.

Weights come from `tokenloom.loading.export.hf_state_dict` (HF names, dense). A weight shared by two
names (a tied lm_head) is written once, under its first name, as transformers does; past
`max_shard_size` the weights are split into shards with a model.safetensors.index.json.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from tokenloom.compat.model_config import dtype_name

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
_IGNORED = frozenset({"is_main_process", "save_function", "token", "variant", "save_original_format"})


def parse_size(value: int | str) -> int:
    """5_000_000, "5GB" or "500MiB" -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"max_shard_size must be a positive size such as 5GB or 500MB, got {value!r}")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])


def hf_config_dict(model: Any) -> dict[str, Any]:
    """config.json for the weights as written: transformers' keys, the current dtype, architectures."""
    config = model.config.to_dict()
    if config.get("model_type") == "gemma3" and isinstance(config.get("text_config"), dict):
        # the text backbone of a multimodal checkpoint (its vision tower was never loaded)
        config = {**config["text_config"], "model_type": "gemma3_text",
                  "architectures": ["Gemma3ForCausalLM"], "_name_or_path": config.get("_name_or_path")}
    config.pop("quantization_config", None)
    config = {k: v for k, v in config.items() if not k.startswith("_") or k == "_name_or_path"}
    config["dtype"] = config["torch_dtype"] = dtype_name(model.dtype)
    return config


def _unique(state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Tensors sharing memory are written once under their first name when the config ties them (the
    loader ties them back), copied otherwise; all on the CPU, contiguous."""
    seen: dict[tuple[Any, ...], str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tensor.stride())  # fmt: skip
        if seen.setdefault(key, name) == name:
            out[name] = tensor.detach().to("cpu").contiguous()
        elif not tied:  # safetensors stores no shared memory: its own copy
            out[name] = tensor.detach().to("cpu").clone()
    return out


def _shards(state: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def save_pretrained(
    model: Any,
    save_directory: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "5GB",
    safe_serialization: bool = True,
    push_to_hub: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
    **kwargs: Any,
) -> None:
    from safetensors.torch import save_file

    from tokenloom.loading.export import hf_state_dict

    unknown = sorted(set(kwargs) - _IGNORED)
    if unknown:
        raise TypeError(f"save_pretrained() got unexpected argument(s): {', '.join(unknown)}")
    if not safe_serialization:
        raise NotImplementedError("save_pretrained(safe_serialization=False) is not supported: tokenloom writes "
                                  "safetensors only (pickle-based .bin files are never read or written)")
    if push_to_hub:
        raise NotImplementedError("save_pretrained(push_to_hub=True) is not supported: save to a directory, then "
                                  "upload it with huggingface_hub (HfApi().upload_folder)")
    limit = parse_size(max_shard_size)
    directory = Path(save_directory)
    if directory.is_file():
        raise ValueError(f"save_pretrained: {directory} is a file, not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    config = hf_config_dict(model)
    weights = _unique(state_dict if state_dict is not None else hf_state_dict(model.causal_lm),
                      tied=bool(config.get("tie_word_embeddings", False)))
    for stale in [directory / WEIGHTS_NAME, directory / INDEX_NAME, *directory.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    shards = _shards(weights, limit)
    if len(shards) == 1:
        save_file(shards[0], str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in weights.values())
        (directory / INDEX_NAME).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n",
            encoding="utf-8")  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    model.generation_config.save_pretrained(directory)
