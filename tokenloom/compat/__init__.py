"""The transformers-compatible face: AutoModelForCausalLM, AutoTokenizer, GenerationConfig, streamers, pipeline."""

from typing import Any

from tokenloom.compat.streamers import AsyncTextIteratorStreamer, TextIteratorStreamer, TextStreamer

__all__ = ["AsyncTextIteratorStreamer", "TextIteratorStreamer", "TextStreamer", "pipeline"]


def __getattr__(name: str) -> Any:
    # pipeline pulls in the model (torch); importing the compat tokenizer must not. Importing the
    # submodule binds its name here to the module, so the function is bound over it afterwards.
    if name == "pipeline":
        from tokenloom.compat.pipeline import pipeline

        globals()["pipeline"] = pipeline
        return pipeline
    raise AttributeError(f"module 'tokenloom.compat' has no attribute {name!r}")
