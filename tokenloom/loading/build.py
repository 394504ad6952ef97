"""Checkpoint -> model on a device (L3), through per-parameter loaders.

The model is built on the meta device; every checkpoint tensor is routed by name to the module that
takes it. A model class's `packed_modules_mapping` (as nano-vllm's) names fused projections: the
checkpoint's `q_proj`, `k_proj`, `v_proj` become row blocks 0, 1, 2 of the module `qkv_proj`, and
`gate_proj`, `up_proj` blocks 0, 1 of `gate_up_proj`. Once every tensor is routed, each weight-format
module (`models/linear.py`) is materialised in its final format straight from the stored tensors
(`formats.py`), a few at a time on worker threads; plain parameters (norms, GPT-2's Conv1D) are set
as dense tensors of the model dtype.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from tokenloom.device import WeightPlan
from tokenloom.errors import ModelLoadError
from tokenloom.loading.checkpoint import Checkpoint
from tokenloom.loading.formats import (
    head_kernel_source,
    materialize_embedding,
    materialize_linear,
    stored_shape,
    to_dense,
)
from tokenloom.models.base import CausalLM
from tokenloom.models.head import ShortlistHead
from tokenloom.models.linear import Embedding, Linear
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
# The tied output projection reads the embedding's tensor when the checkpoint has no lm_head.
_TIED = ("lm_head", "model.embed_tokens")


def is_ignored_tensor(name: str) -> bool:
    """Whether a checkpoint tensor the model has no parameter for may be skipped."""
    return _IGNORED_TENSORS.search(name) is not None


@dataclass
class _Slot:
    """The stored tensors routed to one weight-format module: weight (and bias) row blocks."""

    name: str
    module: nn.Module
    weights: dict[int | None, Any] = field(default_factory=dict)  # block index, None: the whole weight
    biases: dict[int | None, Any] = field(default_factory=dict)


def build_model(
    checkpoint: Checkpoint,
    device: torch.device,
    plan: WeightPlan | torch.dtype,
    *,
    quantize_bits: int | None = None,
    progress: bool = False,
    num_workers: int | None = None,
) -> CausalLM:
    """Instantiate the architecture named by the config and fill it with the checkpoint's tensors,
    each in the format `plan` asks for (a bare dtype: the exact mode in that dtype)."""
    if isinstance(plan, torch.dtype):
        plan = WeightPlan(plan, quantize_bits=quantize_bits)
    model_cls = model_class_for(checkpoint.config)
    config = model_cls.config_class.from_dict(checkpoint.config)  # type: ignore[attr-defined]
    with torch.device("meta"):
        model = model_cls(config)
    router = _Router(model, getattr(model_cls, "packed_modules_mapping", {}), checkpoint, config.model_type)
    stored = checkpoint.iter_stored() if checkpoint.iter_stored is not None else checkpoint.iter_tensors()
    if progress:
        stored = tqdm(stored, total=checkpoint.num_tensors, desc="Loading weights", unit="tensor")
    for name, tensor in stored:
        router.route(name, tensor)
    router.tie(bool(config.tie_word_embeddings))
    router.check_complete()

    # The output projection's weight is dense in every mode: logits rounded to bfloat16 (the quantized
    # kernels' output) flip greedy choices between near-tied tokens. Tied to the embedding, it shares
    # the embedding's Parameter, which is then dense too (as transformers ties them). The default mode
    # on the CPU adds the stored blocks' kernel for decode steps, whose best logits are recomputed
    # from the dense weight (`ShortlistHead`).
    dense = WeightPlan(plan.dtype)
    head_stored = router.stored_head()
    shared = router.drop_tied_head()
    jobs: list[tuple[str, Callable[[], Any]]] = []
    for slot in router.slots.values():
        is_head = slot.name == _TIED[0] or (shared and slot.name == _TIED[1])
        jobs.append((slot.name, _slot_job(slot, device, dense if is_head else plan)))
    for (module_name, attr), tensor in router.params.items():
        jobs.append((f"{module_name}.{attr}" if module_name else attr, _param_job(tensor, device, plan.dtype)))
    for name, value in _run_jobs(jobs, num_workers):
        _set_by_name(model, name, value)
    if shared:
        model.get_submodule(_TIED[0]).weight = model.get_submodule(_TIED[1]).weight
    _add_shortlist(model, head_stored, device, plan)

    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                if buffer.is_meta:
                    raise ModelLoadError(f"buffer {name} of {type(module).__name__} was not initialised")
                module._buffers[name] = buffer.to(device)
    return model.eval().requires_grad_(False)


class _Router:
    """Maps checkpoint names to slots (weight-format modules) and plain parameters, checking shapes."""

    def __init__(self, model: nn.Module, packed: dict[str, tuple[str, int]], checkpoint: Checkpoint,
                 model_type: str) -> None:
        self.model, self.packed, self.checkpoint, self.model_type = model, packed, checkpoint, model_type
        self.modules = dict(model.named_modules())
        self.slots: dict[str, _Slot] = {}
        self.params: dict[tuple[str, str], Any] = {}
        self.tied = False
        self.expected_params = {
            (module_name, attr)
            for module_name, module in self.modules.items()
            if not isinstance(module, (Linear, Embedding))
            for attr, param in module.named_parameters(recurse=False)
        }

    def _target(self, name: str) -> tuple[str, str, int | None]:
        """(module name, attribute, row block): a packed name gives its block of the fused module."""
        module_name, _, attr = name.rpartition(".")
        parent, _, leaf = module_name.rpartition(".")
        if module_name not in self.modules and leaf in self.packed:
            fused, index = self.packed[leaf]
            return f"{parent}.{fused}" if parent else fused, attr, index
        return module_name, attr, None

    def route(self, name: str, tensor: Any) -> None:
        module_name, attr, index = self._target(name)
        module = self.modules.get(module_name)
        takes_bias = isinstance(module, Linear) and module.bias is not None
        if isinstance(module, (Linear, Embedding)) and (attr == "weight" or (attr == "bias" and takes_bias)):
            slot = self.slots.setdefault(module_name, _Slot(module_name, module))
            parts = slot.weights if attr == "weight" else slot.biases
            self._check_shape(name, tensor, _expected_block(module, attr, index))
            parts[index] = tensor
            return
        if (module_name, attr) in self.expected_params:
            expected = tuple(getattr(module, attr).shape)
            self._check_shape(name, tensor, expected)
            self.params[(module_name, attr)] = tensor
            return
        if is_ignored_tensor(name):
            logger.debug("ignoring checkpoint tensor %s", name)
            return
        raise ModelLoadError(
            f"{self.checkpoint.source.path} holds tensor {name} (shape {stored_shape(tensor)}), which the "
            f"{self.model_type} model built from its config has no parameter for",
            hint="the config does not describe these weights (e.g. q/k/v biases in the checkpoint "
            "but no attention_bias=true in config.json); tokenloom does not drop weights silently",
        )

    def _check_shape(self, name: str, tensor: Any, expected: tuple[int, ...]) -> None:
        shape = stored_shape(tensor)
        if shape != expected:
            raise ModelLoadError(
                f"tensor {name} has shape {shape} in {self.checkpoint.source.path}, the model expects {expected}"
            )

    def _missing_blocks(self, module_name: str, attr: str, have: dict[int | None, Any], blocks: int) -> list[str]:
        """Checkpoint names of the blocks not routed to a module (q_proj for block 0 of qkv_proj)."""
        if None in have or (blocks == 1 and 0 in have):
            return []
        parent, _, leaf = module_name.rpartition(".")
        names = {index: name for name, (fused, index) in self.packed.items() if fused == leaf}
        if not names:
            return [f"{module_name}.{attr}"]
        prefix = f"{parent}." if parent else ""
        return [f"{prefix}{names[i]}.{attr}" for i in range(blocks) if i not in have and i in names]

    def tie(self, tie_word_embeddings: bool) -> None:
        head, embedding = _TIED
        head_module = self.modules.get(head)
        if not tie_word_embeddings or not isinstance(head_module, Linear) or head in self.slots:
            return
        source = self.slots.get(embedding)
        if source is not None and None in source.weights:
            self.slots[head] = _Slot(head, head_module, {None: source.weights[None]})
            self.tied = True

    def stored_head(self) -> Any:
        """The checkpoint tensor of the output projection (tied: the embedding's), when it is one
        unbiased tensor; else None."""
        slot = self.slots.get(_TIED[0])
        if slot is None or slot.biases or set(slot.weights) != {None}:
            return None
        return slot.weights[None]

    def drop_tied_head(self) -> bool:
        """Whether the head is tied to the embedding (its slot is dropped: it will share the
        embedding's Parameter)."""
        if self.tied:
            del self.slots[_TIED[0]]
        return self.tied

    def check_complete(self) -> None:
        missing = []
        for module_name, module in self.modules.items():
            if isinstance(module, (Linear, Embedding)):
                slot = self.slots.get(module_name)
                blocks = len(module.output_sizes) if isinstance(module, Linear) else 1
                missing += self._missing_blocks(module_name, "weight", slot.weights if slot else {}, blocks)
                if isinstance(module, Linear) and module.bias is not None:
                    missing += self._missing_blocks(module_name, "bias", slot.biases if slot else {}, blocks)
        missing += sorted(f"{m}.{a}" if m else a for m, a in self.expected_params - set(self.params))
        if missing:
            raise ModelLoadError(
                f"{self.checkpoint.source.path} lacks {len(missing)} weight(s) the model needs, "
                f"e.g. {missing[:3]}"
            )


def _expected_block(module: nn.Module, attr: str, index: int | None) -> tuple[int, ...]:
    if isinstance(module, Embedding):
        return (module.num_embeddings, module.embedding_dim)
    assert isinstance(module, Linear)
    if index is None:
        rows = module.out_features
    elif index < len(module.output_sizes):
        rows = module.output_sizes[index]
    else:
        return ()
    return (rows, module.in_features) if attr == "weight" else (rows,)


def _add_shortlist(model: nn.Module, stored: Any, device: torch.device, plan: WeightPlan) -> None:
    """Put a `ShortlistHead` in place of the dense output projection where the plan runs the stored
    blocks on a kernel (see tokenloom.models.head); the dense weight (and its tie) stays as it is."""
    head = getattr(model, _TIED[0], None)
    if type(head) is not Linear or head.bias is not None:
        return
    source = head_kernel_source(stored, device, plan)
    if source is not None:
        setattr(model, _TIED[0], ShortlistHead(head.weight, source, max_kernel_rows=plan.kernels.max_kernel_rows))


def _slot_job(slot: _Slot, device: torch.device, plan: WeightPlan) -> Callable[[], nn.Module]:
    if isinstance(slot.module, Embedding):
        return lambda: materialize_embedding(slot.module, slot.weights[None], device, plan)
    return lambda: materialize_linear(slot.module, slot.weights, slot.biases, device, plan, plan.quantize_bits)


def _param_job(tensor: Any, device: torch.device, dtype: torch.dtype) -> Callable[[], nn.Parameter]:
    return lambda: nn.Parameter(to_dense(tensor, device, dtype), requires_grad=False)


def _run_jobs(jobs: list[tuple[str, Callable[[], Any]]], num_workers: int | None) -> Iterator[tuple[str, Any]]:
    """Run the jobs on worker threads that each use one torch thread: with few cores (and neighbours
    using them) torch's intra-op threads mostly wait at barriers on tensors this small."""
    workers = num_workers if num_workers is not None else _default_workers()
    if workers <= 1:
        for name, job in jobs:
            yield name, job()
        return
    num_threads = torch.get_num_threads()  # a worker's setting becomes the default of later threads
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="tokenloom-load",
                                initializer=torch.set_num_threads, initargs=(1,)) as pool:
            futures = [(name, pool.submit(job)) for name, job in jobs]
            for name, future in futures:
                yield name, future.result()
    finally:
        torch.set_num_threads(num_threads)


def _default_workers() -> int:
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cpus))


def _set_by_name(model: nn.Module, name: str, value: Any) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, value)
