"""tokenloom: a fast, faithful LLM text-generation engine with a transformers-compatible face."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Imported lazily so that `import tokenloom` (and the CLI's --help) stay fast and torch-free.
_EXPORTS = {
    "AutoModelForCausalLM": "tokenloom.compat.model",
    "AutoTokenizer": "tokenloom.compat.tokenizer",
    "GenerationConfig": "tokenloom.compat.generation_config",
    "set_seed": "tokenloom.compat.seed",
    "LLM": "tokenloom.llm",
    "SamplingParams": "tokenloom.sampling_params",
    "EngineConfig": "tokenloom.config",
    "RequestOutput": "tokenloom.outputs",
    "pipeline": "tokenloom.compat.pipeline",
    "TextStreamer": "tokenloom.compat.streamers",
    "TextIteratorStreamer": "tokenloom.compat.streamers",
    "AsyncTextIteratorStreamer": "tokenloom.compat.streamers",
}

if TYPE_CHECKING:
    from tokenloom.compat.generation_config import GenerationConfig
    from tokenloom.compat.model import AutoModelForCausalLM
    from tokenloom.compat.pipeline import pipeline
    from tokenloom.compat.seed import set_seed
    from tokenloom.compat.streamers import AsyncTextIteratorStreamer, TextIteratorStreamer, TextStreamer
    from tokenloom.compat.tokenizer import AutoTokenizer
    from tokenloom.config import EngineConfig
    from tokenloom.llm import LLM
    from tokenloom.outputs import RequestOutput
    from tokenloom.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tokenloom' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    """The public names (tab completion, help()) and the submodules already imported, without
    importing anything."""
    return sorted({*__all__, *(k for k in globals() if not k.startswith("_"))} - {"annotations", "TYPE_CHECKING", "Any"})


__all__ = [
    "LLM",
    "AsyncTextIteratorStreamer",
    "AutoModelForCausalLM",
    "AutoTokenizer",
    "EngineConfig",
    "GenerationConfig",
    "RequestOutput",
    "SamplingParams",
    "TextIteratorStreamer",
    "TextStreamer",
    "__version__",
    "pipeline",
    "set_seed",
]
