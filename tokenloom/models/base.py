"""What every architecture provides to the runner (L2)."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from tokenloom.attention.paged import AttentionMetadata
from tokenloom.cache.kv_cache import KVCache
from tokenloom.errors import ConfigError
from tokenloom.models.config_checks import check_model_config, check_raw_config

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
        """Build from config.json keys; unknown keys are ignored, derived fields computed here.
        Raises ConfigError (a ValueError) naming the key and the value of anything malformed."""
        raise NotImplementedError

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every architecture's from_dict checks the raw keys first (config_checks), and a value it still
        cannot use becomes a ConfigError rather than a KeyError/TypeError from deep inside."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("from_dict")
        if isinstance(own, classmethod):
            cls.from_dict = classmethod(_checked_from_dict(own.__func__))  # type: ignore[method-assign,assignment]

    @classmethod
    def _pick(cls: type[C], raw: dict[str, Any], **values: Any) -> C:
        fields = dataclasses.fields(cls)
        names = {f.name for f in fields}
        kwargs = {k: v for k, v in raw.items() if k in names}
        kwargs.update(values)
        missing = [
            f.name for f in fields
            if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(f"the config lacks {', '.join(repr(m) for m in missing)}")
        config = cls(**kwargs)
        check_model_config(config)
        return config


def _checked_from_dict(from_dict: Any) -> Any:
    @functools.wraps(from_dict)
    def checked(cls: type[C], raw: dict[str, Any]) -> C:
        check_raw_config(raw)
        try:
            return from_dict(cls, raw)
        except ConfigError:
            raise
        except KeyError as exc:
            raise ConfigError(f"the config lacks {exc.args[0]!r}") from exc
        except (ValueError, TypeError, ZeroDivisionError, OverflowError) as exc:
            raise ConfigError(f"the config cannot be used: {exc}") from exc

    return checked


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
