"""What every model source (GGUF file, HF directory) hands to the model builder."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch


@dataclass
class ModelSource:
    """A resolved, local model location."""

    kind: Literal["gguf", "hf"]
    path: Path  # the .gguf file, or the HF directory


@dataclass
class Checkpoint:
    """Config and weights of one model, in Hugging Face vocabulary.

    config: the keys of config.json (GGUF metadata mapped to the same keys).
    generation_config: the keys of generation_config.json ({} when absent).
    iter_tensors: yields (HF parameter name, float tensor) pairs, dequantized, in HF layout.
    iter_stored: the same tensors as stored when that differs (GGUF quantized blocks kept as
        `GGUFTensor`, memory-mapped views); None: iter_tensors.
    """

    source: ModelSource
    config: dict[str, Any]
    generation_config: dict[str, Any]
    iter_tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    num_tensors: int | None = None
    iter_stored: Callable[[], Iterator[tuple[str, Any]]] | None = None


# The special-token attributes transformers tokenizers name (tokenizer_config.json keys).
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass
class TokenizerData:
    """A ready `tokenizers.Tokenizer` plus what tokenizer_config.json (or GGUF metadata) says about it.

    The tokenizer's post-processor is authoritative for special tokens added on encode
    (add_special_tokens=True); add_bos_token/add_eos_token are recorded for information.
    """

    tokenizer: Any  # tokenizers.Tokenizer
    bos_token: str | None = None
    eos_token: str | None = None
    unk_token: str | None = None
    pad_token: str | None = None
    add_bos_token: bool = False
    add_eos_token: bool = False
    chat_template: str | None = None
    model_max_length: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
