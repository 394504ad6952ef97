"""Typed errors. Every error carries a message naming the problem and, where useful, a hint."""

from __future__ import annotations


class TokenloomError(Exception):
    """Base class for every error tokenloom raises on purpose."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class ModelLoadError(TokenloomError):
    """A model or tokenizer could not be loaded."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The path, pull name or hub id does not lead to a model."""


class GGUFFormatError(ModelLoadError):
    """The file is not a readable GGUF file (wrong magic, truncated, unsupported tensor type)."""


class MissingShardError(ModelLoadError):
    """A safetensors shard named by the index file is absent."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint's architecture (model_type) has no implementation here."""


class HubUnavailableError(ModelLoadError):
    """A hub id could not be resolved (no network, offline mode, unknown repo)."""


class PullError(TokenloomError):
    """`tokenloom pull` failed (unknown name, download failure)."""


class ChecksumError(PullError):
    """A downloaded file does not have the recorded sha256."""
