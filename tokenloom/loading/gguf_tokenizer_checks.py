"""Types of a GGUF file's tokenizer metadata (tokenizer.*), checked before the tokenizer is rebuilt and
before the model loader maps token ids into the config, so both refuse a malformed file with the same
TokenizerError (L3, no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenloom.errors import TokenizerError
from tokenloom.loading.gguf_arrays import GGUFStrings


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_tokenizer_metadata(md: dict[str, Any], path: Path) -> None:
    """The types of the tokenizer metadata (tokenizer.*) the rebuild reads: a wrong one is a TokenizerError
    naming the file, the key and the value, never an exception from deep inside the rebuild. The model
    loader runs the same check, so a model and its tokenizer refuse such a file with the same error."""
    try:
        _check_metadata(md)
    except TokenizerError as exc:
        raise TokenizerError(f"{path}: {exc}", hint=exc.hint) from exc


def _check_metadata(md: dict[str, Any]) -> None:
    def bad(key: str, expected: str) -> TokenizerError:
        value = md[key]
        shown = f"a list starting {value[:3]!r}" if isinstance(value, list) else repr(value)[:80]
        return TokenizerError(f"{key} must be {expected}, got {shown} ({type(value).__name__})")

    def list_of(key: str, types: frozenset[type], expected: str) -> None:
        # exact types (a bool is not an integer here), collected at C speed: vocabularies have 10^5 items
        if key in md:
            value = md[key]
            if isinstance(value, GGUFStrings) and str in types:
                return  # a string array of the file, each element checked by the parse
            if not isinstance(value, list) or not set(map(type, value)) <= types:
                raise bad(key, expected)

    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        if key in md and not isinstance(md[key], str):
            raise bad(key, "a string")
    list_of("tokenizer.ggml.tokens", frozenset({str}), "a list of strings")
    list_of("tokenizer.ggml.merges", frozenset({str}), "a list of strings")
    list_of("tokenizer.ggml.token_type", frozenset({int}), "a list of integers")
    list_of("tokenizer.ggml.scores", frozenset({int, float}), "a list of numbers")
    for name in ("bos", "eos", "unknown", "padding", "sep", "cls", "mask"):
        key = f"tokenizer.ggml.{name}_token_id"
        if key in md and not _is_int(md[key]):
            raise bad(key, "an integer token id")
    for name in ("add_bos_token", "add_eos_token", "add_space_prefix"):
        key = f"tokenizer.ggml.{name}"
        if key in md and not (isinstance(md[key], bool) or md[key] in (0, 1)):
            raise bad(key, "true or false")
