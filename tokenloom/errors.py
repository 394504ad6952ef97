"""Typed errors. Every error carries a message naming the problem and, where useful, a hint.

The load errors name the file, the field and the value; each class has a default hint, so the CLI
always prints one line plus a hint."""

from __future__ import annotations


class TokenloomError(Exception):
    """Base class for every error tokenloom raises on purpose."""

    default_hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint if hint is not None else self.default_hint


class ModelLoadError(TokenloomError):
    """A model or tokenizer could not be loaded."""

    default_hint = (
        "the model files are malformed or not supported; download them again, or use another copy of the model"
    )


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The path, pull name or hub id does not lead to a model."""

    default_hint = "check the path; `tokenloom pull` (no name) lists the models it can download"


class GGUFFormatError(ModelLoadError):
    """The file is not a readable GGUF file (wrong magic, truncated, unsupported tensor type, a header
    field of the wrong type or out of bounds)."""

    default_hint = (
        "the GGUF file is damaged or was not written by a GGUF writer; download it again "
        "(`tokenloom pull NAME`) or convert the model again with llama.cpp"
    )


class ConfigError(ModelLoadError, ValueError):
    """A model configuration value (config.json key or GGUF metadata mapped to it) is missing, of the
    wrong type or out of range."""

    default_hint = "fix the named key in config.json (or the GGUF metadata it comes from), or use an unmodified copy"


class TokenizerError(ModelLoadError, ValueError):
    """Tokenizer data (tokenizer.json, tokenizer_config.json, GGUF tokenizer metadata) is malformed."""

    default_hint = "the tokenizer files or metadata are damaged; use an unmodified copy of the model"


class ChatTemplateError(TokenloomError, ValueError):
    """A chat template could not be compiled or rendered, tried to escape its sandbox, or went over its
    render budget (time, loop iterations, output size, value sizes)."""

    default_hint = "fix the chat template (the model's own, or the one passed with chat_template= / --chat-template)"


class MissingShardError(ModelLoadError):
    """A safetensors shard named by the index file is absent."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint's architecture (model_type) has no implementation here."""

    default_hint = "check config.json's model_type (or the GGUF's general.architecture)"


class HubUnavailableError(ModelLoadError):
    """A hub id could not be resolved (no network, offline mode, unknown repo)."""


class PullError(TokenloomError):
    """`tokenloom pull` failed (unknown name, download failure)."""


class ChecksumError(PullError):
    """A downloaded file does not have the recorded sha256."""
