"""Incremental detokenization: token ids in, UTF-8-safe text deltas out, stop strings matched."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

# How many prompt tokens to decode in front of the first generated ones, so that rules that depend
# on the preceding token (a SentencePiece word-start space, for one) apply as they do mid-text.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    """What the detokenizer needs of a tokenizer (tokenloom's `Tokenizer` and transformers' fit)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


def find_stop(text: str, stop: Sequence[str], start: int = 0) -> tuple[int, str] | None:
    """The stop string that is complete earliest in `text` (ignoring matches that end at or before
    `start`), as (index where it begins, the string). Matches that end at the same place: the
    longest wins, so the text before it holds no stop string either."""
    best: tuple[int, int, str] | None = None  # (end, -length, string)
    for s in stop:
        index = text.find(s, max(0, start - len(s) + 1))
        if index >= 0:
            candidate = (index + len(s), -len(s), s)
            if best is None or candidate < best:
                best = candidate
    if best is None:
        return None
    end, _, s = best
    return end - len(s), s


def partial_stop_length(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string: the text
    that could still become the start of a match and so must not be released yet."""
    longest = max((len(s) for s in stop), default=0)
    for length in range(min(longest - 1, len(text)), 0, -1):
        tail = text[-length:]
        if any(s.startswith(tail) for s in stop):
            return length
    return 0


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas, one token at a time, and watches for stop strings.

    It keeps two offsets into its token window: `prefix_offset` (where the last decode window
    starts) and `read_offset` (the end of the text already decoded). Each push decodes
    ids[prefix_offset:] and keeps only what lies beyond decode(ids[prefix_offset:read_offset]),
    so every tokenizer rule that looks at neighbouring tokens applies the way it does in a full
    decode. While the new text ends with U+FFFD (a multi-byte character split across tokens) it is
    held back until the character is complete; `flush()` returns whatever is still held.

    With `stop` strings, the decoded text is searched after every push; the first complete match
    (see `find_stop`) sets `stop_match`, and the text ends right before it (right after it with
    `include_stop_str_in_output`). Until then the longest tail of the text that could begin a
    match is held back too, so no delta ever carries a piece of a stop string that is later cut.
    Pushes after a match return "".

    `text` is everything released so far ("".join(all deltas)). Without stop strings and without
    `prompt_ids`, "".join(all deltas) + flush() == tokenizer.decode(generated ids,
    skip_special_tokens). With `prompt_ids`, the last few prompt tokens are decoded in front of
    the generated ones: for byte-level BPE tokenizers the result is the same; for SentencePiece
    tokenizers the first delta keeps the leading space of a word-start token, which a decode of the
    generated ids alone strips (the text then joins correctly onto the prompt).
    """

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = False,
        stop: str | Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [stop] if isinstance(stop, str) else list(stop)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        self.include_stop_str_in_output = include_stop_str_in_output
        context = [int(i) for i in (prompt_ids or [])][-_PROMPT_CONTEXT_TOKENS:]
        if context and self._decode(context).endswith(_REPLACEMENT_CHAR):
            context = []  # the prompt ends inside a character: its context would only garble the first delta
        self._ids: list[int] = context
        self.prefix_offset = 0
        self.read_offset = len(context)
        self._num_context = len(context)
        self.decoded_text = ""  # all text decoded so far, held-back tail included
        self.text = ""  # the text released so far
        self.stop_match: str | None = None  # the stop string that ended the text

    @property
    def token_ids(self) -> list[int]:
        """The generated ids pushed so far."""
        return self._ids[self._num_context :]

    @property
    def is_stopped(self) -> bool:
        """True once a stop string matched."""
        return self.stop_match is not None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it releases ("" while a character is
        incomplete or the tail could still begin a stop string)."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def push_many(self, token_ids: Iterable[int]) -> str:
        """Add several tokens at once; return the text they release."""
        self._ids.extend(int(i) for i in token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return the text still held back (an incomplete character decodes as U+FFFD here)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.is_stopped:
            return ""
        before = len(self.decoded_text)
        self.decoded_text += self._decode_new(final)
        if not self.stop:
            return self._release(len(self.decoded_text))
        match = find_stop(self.decoded_text, self.stop, before) if len(self.decoded_text) > before else None
        if match is not None:
            index, self.stop_match = match
            end = index + len(self.stop_match) if self.include_stop_str_in_output else index
            return self._release(end)
        held = 0 if final else partial_stop_length(self.decoded_text, self.stop)
        return self._release(len(self.decoded_text) - held)

    def _decode_new(self, final: bool) -> str:
        """The text the tokens past `read_offset` add, or "" while they do not complete it."""
        if self.read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self._ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) and not final:
            return ""  # e.g. a skipped special token, or bytes that do not make a character yet
        if new_text.endswith(_REPLACEMENT_CHAR) and not final:
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

    def _release(self, end: int) -> str:
        """Release decoded_text up to `end` (never taking back what was released)."""
        if end <= len(self.text):
            return ""
        delta = self.decoded_text[len(self.text) : end]
        self.text += delta
        return delta
