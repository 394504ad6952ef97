"""Incremental detokenization: token ids in, UTF-8-safe text deltas out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenloom.tokenizer import Tokenizer

# How many prompt tokens to decode in front of the first generated ones, so that rules that depend
# on the preceding token (a SentencePiece word-start space, for one) apply as they do mid-text.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas, one token at a time.

    It keeps two offsets into its token window: `prefix_offset` (where the last decode window
    starts) and `read_offset` (the end of the text already returned). Each push decodes
    ids[prefix_offset:] and returns only what lies beyond decode(ids[prefix_offset:read_offset]),
    so every tokenizer rule that looks at neighbouring tokens applies the way it does in a full
    decode. While the new text ends with U+FFFD (a multi-byte character split across tokens) the
    delta is held back until the character is complete; `flush()` returns whatever is still held.

    Without `prompt_ids`, "".join(all deltas) + flush() == tokenizer.decode(generated ids,
    skip_special_tokens). With `prompt_ids`, the last few prompt tokens are decoded in front of
    the generated ones: for byte-level BPE tokenizers the result is the same; for SentencePiece
    tokenizers the first delta keeps the leading space of a word-start token, which a decode of the
    generated ids alone strips (the text then joins correctly onto the prompt).
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None, skip_special_tokens: bool = False
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = [int(i) for i in (prompt_ids or [])][-_PROMPT_CONTEXT_TOKENS:]
        if context and self._decode(context).endswith(_REPLACEMENT_CHAR):
            context = []  # the prompt ends inside a character: its context would only garble the first delta
        self._ids: list[int] = context
        self.prefix_offset = 0
        self.read_offset = len(context)
        self._num_context = len(context)
        self.text = ""

    @property
    def token_ids(self) -> list[int]:
        """The generated ids pushed so far."""
        return self._ids[self._num_context :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes ("" while a character is incomplete)."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def push_many(self, token_ids: Iterable[int]) -> str:
        """Add several tokens at once; return the text they complete."""
        self._ids.extend(int(i) for i in token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return the text still held back (an incomplete character decodes as U+FFFD here)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self._ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) and not final:
            return ""  # e.g. a skipped special token, or bytes that do not make a character yet
        if new_text.endswith(_REPLACEMENT_CHAR) and not final:
            return ""
        delta = new_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self._ids)
        self.text += delta
        return delta
