"""What every architecture provides to the runner (L2)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from tokenloom.attention.paged import AttentionMetadata
from tokenloom.cache.kv_cache import KVCache

C = TypeVar("C", bound="ModelConfig")


@dataclass
class ModelConfig:
    """Fields the engine needs from any architecture; subclasses add their own."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    torch_dtype: str | None = None
    # Sliding-window attention, transformers' convention: layer i attends the last `sliding_window`
    # positions (itself included) when layer_types[i] == "sliding_attention"; layer_types None with
    # a sliding_window set means every layer slides.
    sliding_window: int | None = None
    layer_types: list[str] | None = None

    def window_for_layer(self, layer_index: int) -> int | None:
        """How many positions layer `layer_index` attends (None: the whole context). A window as long
        as the context never cuts anything (Phi-3.5 configs say 262144 for a 131072 context), so it
        counts as none: a pool sized for such a window could never be allocated."""
        if not self.sliding_window or self.sliding_window >= self.max_position_embeddings:
            return None
        if self.layer_types is None or self.layer_types[layer_index] == "sliding_attention":
            return self.sliding_window
        return None

    @property
    def kv_window(self) -> int | None:
        """The longest window over all layers, None when some layer attends the whole context: KV
        positions older than this are needed by no layer, so their blocks can be freed."""
        windows = [self.window_for_layer(i) for i in range(self.num_hidden_layers)]
        return None if any(w is None for w in windows) else max(windows)  # type: ignore[type-var]

    @classmethod
    def from_dict(cls: type[C], raw: dict[str, Any]) -> C:
        """Build from config.json keys; unknown keys are ignored, derived fields computed here."""
        raise NotImplementedError

    @classmethod
    def _pick(cls: type[C], raw: dict[str, Any], **values: Any) -> C:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in names}
        kwargs.update(values)
        return cls(**kwargs)


class CausalLM(nn.Module):
    """A decoder over a flat ragged batch of tokens and the paged KV cache."""

    config: ModelConfig

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_cache: KVCache,
        attn_meta: AttentionMetadata,
    ) -> torch.Tensor:  # hidden states [num_tokens, hidden_size]
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [rows, hidden_size] -> [rows, vocab_size]
        raise NotImplementedError
