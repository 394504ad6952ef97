"""model_type -> architecture (L2)."""

from __future__ import annotations

from typing import Any

from tokenloom.errors import UnsupportedModelError
from tokenloom.models.base import CausalLM
from tokenloom.models.gemma3 import Gemma3ForCausalLM
from tokenloom.models.gpt2 import GPT2LMHeadModel
from tokenloom.models.llama import LlamaForCausalLM
from tokenloom.models.phi3 import Phi3ForCausalLM
from tokenloom.models.qwen2 import Qwen2ForCausalLM
from tokenloom.models.qwen3 import Qwen3ForCausalLM

_ARCHITECTURES: dict[str, type[CausalLM]] = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "phi3": Phi3ForCausalLM,
    "gpt2": GPT2LMHeadModel,
    "gemma3_text": Gemma3ForCausalLM,
}
_ALIASES: dict[str, str] = {
    "mistral": "llama",
    # Gemma3ForConditionalGeneration checkpoints: their text backbone (the loader skips the vision tower)
    "gemma3": "gemma3_text",
}


def supported_model_types() -> list[str]:
    return sorted([*_ARCHITECTURES, *_ALIASES])


def model_class_for(config: dict[str, Any]) -> type[CausalLM]:
    model_type = config.get("model_type")
    name = _ALIASES.get(model_type, model_type) if isinstance(model_type, str) else None
    if name not in _ARCHITECTURES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported model types: "
            + ", ".join(supported_model_types()),
            hint="check config.json's model_type, or open an issue asking for this architecture",
        )
    return _ARCHITECTURES[name]
