"""model_type -> architecture (L2)."""

from __future__ import annotations

from typing import Any

from tokenloom.errors import UnsupportedModelError
from tokenloom.models.base import CausalLM
from tokenloom.models.llama import LlamaForCausalLM

_ARCHITECTURES: dict[str, type[CausalLM]] = {
    "llama": LlamaForCausalLM,
}
_ALIASES: dict[str, str] = {
    "mistral": "llama",
}


def supported_model_types() -> list[str]:
    return sorted([*_ARCHITECTURES, *_ALIASES])


def model_class_for(config: dict[str, Any]) -> type[CausalLM]:
    model_type = config.get("model_type")
    name = _ALIASES.get(model_type, model_type)  # type: ignore[arg-type]
    if name not in _ARCHITECTURES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported model types: "
            + ", ".join(supported_model_types()),
            hint="check config.json's model_type, or open an issue asking for this architecture",
        )
    return _ARCHITECTURES[name]
