"""Read a Hugging Face checkpoint directory: config.json, generation_config.json, safetensors weights.

Weights come from `model.safetensors` or from the shards named by `model.safetensors.index.json`;
tensors are memory-mapped views (no copy until read), one at a time, under the names they are stored
with (HF names).
PyTorch `.bin` checkpoints are not read (they need pickle); the error says so.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tokenloom.errors import ConfigError, MissingShardError, ModelLoadError, ModelNotFoundError
from tokenloom.loading.checkpoint import Checkpoint, ModelSource
from tokenloom.loading.files import read_json_object
from tokenloom.loading.paths import contained_path
from tokenloom.loading.safetensors_mmap import SafetensorsMap
from tokenloom.models.config_checks import declared_layers

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"


# model_type -> prefixes of tensors that belong to no part of the text model tokenloom builds (the
# vision tower of a multimodal checkpoint); they are left out of the shard plan and never read.
_SKIPPED_PREFIXES: dict[str, tuple[str, ...]] = {
    "gemma3": (
        "vision_tower.",
        "multi_modal_projector.",
        "model.vision_tower.",
        "model.multi_modal_projector.",
    ),
}


def _shard_plan(directory: Path, model_type: object = None) -> list[tuple[Path, list[str] | None]]:
    """[(safetensors file, tensor names to read from it or None for all)], in reading order."""
    single = directory / SAFETENSORS_NAME
    index_path = directory / SAFETENSORS_INDEX_NAME
    skipped = _SKIPPED_PREFIXES.get(str(model_type), ())
    if index_path.is_file():
        index = read_json_object(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index_path} has no 'weight_map' object naming the shard of each tensor")
        names_by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            if skipped and str(name).startswith(skipped):
                continue
            if not isinstance(shard, str):
                raise ModelLoadError(f"{index_path}: the shard of tensor {name!r} must be a file name, got {shard!r}")
            names_by_shard.setdefault(shard, []).append(str(name))
        plan = []
        for shard, names in names_by_shard.items():
            shard_path = contained_path(directory, shard, f"the shard of {names[0]!r} named in {index_path}")
            if not shard_path.is_file():
                raise MissingShardError(
                    f"shard {shard} named in {index_path} is missing",
                    hint="download the checkpoint again; every file the index names must be present",
                )
            plan.append((shard_path, names))
        return plan
    if single.is_file():
        if not skipped:
            return [(single, None)]
        return [(single, [name for name in _tensor_names(single) if not name.startswith(skipped)])]
    bins = sorted(p.name for p in directory.glob("*.bin"))
    if bins:
        raise ModelLoadError(
            f"{directory} holds only PyTorch .bin weights ({', '.join(bins[:3])}); "
            f"tokenloom reads safetensors only ({SAFETENSORS_NAME} or {SAFETENSORS_INDEX_NAME})",
            hint="convert the checkpoint, e.g. load it with transformers and save_pretrained(..., "
            "safe_serialization=True)",
        )
    raise ModelNotFoundError(
        f"{directory} has no weights: expected {SAFETENSORS_NAME} or {SAFETENSORS_INDEX_NAME}",
    )


def _tensor_names(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise ModelLoadError(f"could not read the safetensors header of {path}: {exc}") from exc


def _count_tensors(plan: list[tuple[Path, list[str] | None]]) -> int:
    from safetensors import safe_open

    total = 0
    for path, names in plan:
        if names is not None:
            total += len(names)
        else:
            with safe_open(str(path), framework="pt") as f:
                total += len(list(f.keys()))
    return total


def _iter_plan(plan: list[tuple[Path, list[str] | None]]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path, names in plan:
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as exc:  # safetensors raises its own error types for a damaged header
            raise ModelLoadError(f"could not read safetensors file {path}: {exc}") from exc
        with handle as f:
            stored = set(f.keys())
            mapped = SafetensorsMap(path)  # zero-copy views; safe_open has checked the header
            for name in names if names is not None else list(f.keys()):
                if name not in stored:
                    raise ModelLoadError(
                        f"tensor {name!r} is not in {path.name}, although {SAFETENSORS_INDEX_NAME} says so"
                    )
                tensor = mapped.tensor(name)
                yield name, tensor if tensor is not None else f.get_tensor(name)


# model_type -> the prefix of its base-model parameters in a *ForCausalLM / *LMHeadModel checkpoint.
# Checkpoints saved from the base model (GPT-2's own release among them) store the names without it.
_BASE_MODEL_PREFIXES = {"gpt2": "transformer."}
# model_type -> (stored prefix, HF name prefix of tokenloom's model): the text backbone of a
# Gemma3ForConditionalGeneration, as transformers 4.50-4.x (`language_model.model.`) and 5.x
# (`model.language_model.`) save it.
_RENAMED_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "gemma3": (
        ("language_model.model.", "model."),
        ("model.language_model.", "model."),
        ("language_model.lm_head.", "lm_head."),
    ),
}


def _renamed(
    tensors: Iterator[tuple[str, torch.Tensor]], model_type: object
) -> Iterator[tuple[str, torch.Tensor]]:
    prefix = _BASE_MODEL_PREFIXES.get(str(model_type))
    renames = _RENAMED_PREFIXES.get(str(model_type), ())
    for name, tensor in tensors:
        if prefix and not name.startswith(prefix) and not name.startswith("lm_head."):
            name = prefix + name
        for old, new in renames:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        yield name, tensor


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")
# generation_config.json keys that hold token ids, and those that hold a number of the given kind
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
_GENERATION_TYPES: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(("temperature", "top_p", "min_p", "typical_p", "repetition_penalty", "length_penalty",
                     "epsilon_cutoff", "eta_cutoff", "diversity_penalty", "max_time"), (int, float)),
    **dict.fromkeys(("top_k", "max_length", "max_new_tokens", "min_length", "min_new_tokens", "num_beams",
                     "num_beam_groups", "no_repeat_ngram_size", "num_return_sequences"), (int,)),
    **dict.fromkeys(("do_sample", "use_cache", "renormalize_logits"), (bool,)),
}


def _check_generation_config(generation_config: dict[str, Any], path: Path, vocab_size: Any) -> None:
    """Token ids are ids of this vocabulary, numeric settings are numbers: a wrong type here would
    otherwise surface at the first generate() call, far from the file."""
    for key in _TOKEN_ID_KEYS:
        value = generation_config.get(key)
        ids = value if isinstance(value, list) else [value]
        if value is None:
            continue
        limit = vocab_size if isinstance(vocab_size, int) and not isinstance(vocab_size, bool) else 1 << 31
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < limit for i in ids):
            raise ConfigError(f"{path}: {key} must be a token id in [0, {limit}) or a list of them, got {value!r}")
    for key, kinds in _GENERATION_TYPES.items():
        value = generation_config.get(key)
        if value is not None and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
            raise ConfigError(f"{path}: {key} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 <= value < float("inf"):
            raise ConfigError(f"{path}: {key} must be a finite number >= 0, got {value!r}")


def _check_layers(config: dict[str, Any], plan: list[tuple[Path, list[str] | None]], directory: Path) -> None:
    """A config that declares more layers than the checkpoint's tensors hold is refused before any
    layer is built (num_hidden_layers = 10**9 would otherwise build layers until memory runs out)."""
    declared = declared_layers(config)
    if declared is None:
        return
    names = [name for path, listed in plan for name in (listed if listed is not None else _tensor_names(path))]
    layers = {int(m.group(1)) for name in names if (m := _LAYER_INDEX.search(name))}
    if declared > len(layers):
        raise ConfigError(
            f"{directory / CONFIG_NAME}: num_hidden_layers is {declared}, but the checkpoint's tensors hold "
            f"{len(layers)} layers"
        )


def load_hf_checkpoint(directory: Path) -> Checkpoint:
    """Open an HF checkpoint directory; weights are read only when `iter_tensors()` is iterated."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise ModelNotFoundError(f"model directory {directory} does not exist")
    if not config_path.is_file():
        raise ModelNotFoundError(
            f"{directory} has no {CONFIG_NAME}",
            hint="an HF checkpoint directory needs config.json next to its safetensors weights",
        )
    config = read_json_object(config_path)
    generation_config_path = directory / GENERATION_CONFIG_NAME
    generation_config = read_json_object(generation_config_path, missing_ok=True)
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    _check_generation_config(generation_config, generation_config_path, text_config.get("vocab_size"))
    plan = _shard_plan(directory, config.get("model_type"))
    try:
        num_tensors = _count_tensors(plan)
    except Exception as exc:
        raise ModelLoadError(f"could not read the safetensors header in {directory}: {exc}") from exc
    _check_layers(config, plan, directory)
    return Checkpoint(
        source=ModelSource(kind="hf", path=directory),
        config=config,
        generation_config=generation_config,
        iter_tensors=lambda: _renamed(_iter_plan(plan), config.get("model_type")),
        num_tensors=num_tensors,
    )
