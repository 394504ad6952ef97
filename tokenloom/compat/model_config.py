"""`model.config`: config.json as attributes, with what transformers' PretrainedConfig adds
(architectures, name_or_path, dtype / torch_dtype as a torch.dtype) and `to_dict()`."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

# model_type -> transformers' class, where it is not the name of the class tokenloom builds (an alias)
_ARCHITECTURE_NAMES = {"mistral": "MistralForCausalLM", "gemma3": "Gemma3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


def architecture_name(raw: dict[str, Any], model_class: type) -> str:
    """The transformers class that loads this model's weights as tokenloom holds them."""
    model_type = raw.get("model_type")
    if model_type in _ARCHITECTURE_NAMES:
        return _ARCHITECTURE_NAMES[model_type]
    return model_class.__name__  # tokenloom's architectures carry transformers' class names


def dtype_name(dtype: Any) -> Any:
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype


class ModelConfig(SimpleNamespace):
    """config.json as attributes (config.hidden_size, config.model_type, ...)."""

    @classmethod
    def for_model(cls, raw: dict[str, Any], model_class: type, name_or_path: str, dtype: torch.dtype) -> ModelConfig:
        config = cls(**{k: v for k, v in raw.items() if k not in ("dtype", "torch_dtype")})
        config.architectures = [architecture_name(raw, model_class)]
        config.name_or_path = name_or_path
        config.dtype = dtype
        return config

    @property
    def name_or_path(self) -> str:
        return vars(self).get("_name_or_path", "")

    @name_or_path.setter
    def name_or_path(self, value: str) -> None:
        vars(self)["_name_or_path"] = str(value)

    @property
    def torch_dtype(self) -> Any:
        """The model's dtype (transformers' older name for `dtype`)."""
        return vars(self).get("dtype")

    @torch_dtype.setter
    def torch_dtype(self, value: Any) -> None:
        vars(self)["dtype"] = value

    def to_dict(self) -> dict[str, Any]:
        """The config as config.json holds it (dtypes as their names)."""
        out = {k: dtype_name(v) for k, v in vars(self).items()}
        if "dtype" in out:
            out["torch_dtype"] = out["dtype"]
        return out

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def __contains__(self, key: str) -> bool:
        return hasattr(self, key)
