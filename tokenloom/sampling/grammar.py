"""Structured output (L1t): a request's grammar (JSON schema, regex, choice or Lark/GBNF grammar) as a
token mask, built with llguidance (see docs/structured-output.md for why that library).

- `GrammarVocabulary`: our tokenizer's vocabulary as the grammar library sees it, built once per
  (tokenizer, model vocabulary size, end-of-sequence ids) and cached. Special tokens never match
  grammar text; the end-of-sequence ids are allowed exactly where the grammar may end.
- `GrammarMatcher`: one request's grammar state. `Sequence.append_token` advances it with every
  accepted token; `is_terminated` (the grammar is complete, nothing more may follow, or it failed)
  ends the request in `Sequence.check_stop`.
- `GrammarMask`: the step's mask for the rows that have a grammar, filled on the CPU into one packed
  bitmask [rows, ceil(vocab / 32)] (in parallel across rows), copied to the device once and unpacked
  there, so no row costs a device sync. Rows without a grammar are never touched.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tokenloom.sampling_params import ParameterError, SamplingParams

if TYPE_CHECKING:
    import llguidance

    from tokenloom.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Compact JSON with the separators models usually write; flexible whitespace would let a sampled
# request emit whitespace for ever.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_live_matchers: weakref.WeakSet[GrammarMatcher] = weakref.WeakSet()


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as exc:  # pragma: no cover - a runtime dependency
        raise ParameterError("json_schema", None, "available", "structured output needs the llguidance package "
                             "(pip install llguidance)") from exc
    return llguidance


class GrammarVocabulary:
    """A tokenizer's vocabulary for the grammar library, sized to the model's logits (`vocab_size`:
    ids the tokenizer lacks are never allowed), with `eos_token_ids` as the tokens that end a grammar."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        llg = _llguidance()
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.words = (vocab_size + 31) // 32
        backend = tokenizer.backend
        self.llg_tokenizer: llguidance.LLTokenizer = llg.LLTokenizer(
            backend.to_str(), n_vocab=vocab_size, eos_token=self.eos_token_ids or None
        )
        # a thread pool pays off with a few cores to spare; on one or two it only adds hand-offs
        self.executor: llguidance.LLExecutor | None = llg.LLExecutor() if _num_cpus() >= 4 else None


def _num_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_vocabularies: weakref.WeakKeyDictionary[Any, dict[tuple, GrammarVocabulary]] = weakref.WeakKeyDictionary()
_vocabularies_lock = threading.Lock()


def grammar_vocabulary(tokenizer: Tokenizer, vocab_size: int) -> GrammarVocabulary:
    """The cached `GrammarVocabulary` of `tokenizer` for a model with `vocab_size` logits; its ends are
    the tokenizer's EOS and the chat template's end-of-turn token (both special tokens)."""
    eos = tokenizer.eos_token_ids
    try:
        eos = eos | tokenizer.end_of_turn_token_ids()
    except Exception:  # a broken chat template must not stop structured output
        pass
    eos_ids = tuple(sorted(t for t in eos if t < vocab_size))
    key = (vocab_size, eos_ids)
    with _vocabularies_lock:
        per_tokenizer = _vocabularies.setdefault(tokenizer, {})
        vocabulary = per_tokenizer.get(key)
        if vocabulary is None:
            vocabulary = per_tokenizer[key] = GrammarVocabulary(tokenizer, vocab_size, eos_ids)
    return vocabulary


def grammar_source(params: SamplingParams) -> str | None:
    """The llguidance grammar for the request's constraint, or None when it has none. Raises
    ParameterError naming the field when the constraint cannot be read."""
    structured = params.structured
    if structured is None:
        return None
    llg = _llguidance()
    name, value = structured
    try:
        if name == "json_schema":
            return llg.LLMatcher.grammar_from_json_schema(value, overrides=JSON_OPTIONS)
        if name == "regex":
            return llg.LLMatcher.grammar_from_regex(value)
        if name == "choice":
            # Lark string literals take JSON's escapes
            return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
        from llguidance.gbnf_to_lark import any_to_lark

        return llg.LLMatcher.grammar_from_lark(any_to_lark(value))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ParameterError(name, value, "a valid " + name.replace("_", " "), f"{name} is not valid: {exc}") from None


class GrammarMatcher:
    """One request's position in its grammar. Not thread-safe: the engine thread advances it."""

    def __init__(self, vocabulary: GrammarVocabulary, source: str, field: str = "grammar") -> None:
        llg = _llguidance()
        error = llg.LLMatcher.validate_grammar(source, vocabulary.llg_tokenizer)
        if error:
            raise ParameterError(field, None, "a valid " + field.replace("_", " "), f"{field} is not valid: {error}")
        self.vocabulary = vocabulary
        self.field = field
        self._matcher = llg.LLMatcher(vocabulary.llg_tokenizer, source, log_level=0)
        if self._matcher.is_error():
            raise ParameterError(field, None, "a valid " + field.replace("_", " "),
                                 f"{field} is not valid: {self._matcher.get_error()}")
        self.num_accepted = 0
        _live_matchers.add(self)

    def accept(self, token_id: int) -> bool:
        """Advance by one generated token; False (and the grammar terminates) if it does not fit."""
        if self._matcher.is_stopped():
            return False
        ok = bool(self._matcher.consume_token(token_id))
        if ok:
            self.num_accepted += 1
        else:
            logger.warning("a %s rejected token %d after %d tokens: %s", self.field, token_id, self.num_accepted,
                           self._matcher.get_error())
        return ok

    @property
    def is_terminated(self) -> bool:
        """Nothing more may be generated: the grammar is complete (or was ended by EOS) or failed."""
        return bool(self._matcher.is_stopped())

    @property
    def is_accepting(self) -> bool:
        return bool(self._matcher.is_accepting())

    @property
    def error(self) -> str:
        return self._matcher.get_error()

    @property
    def llg_matcher(self) -> Any:
        return self._matcher


def compile_grammar(params: SamplingParams, tokenizer: Tokenizer | None, vocab_size: int) -> GrammarMatcher | None:
    """The request's grammar state (None without a constraint). Raises ParameterError naming the field
    when the constraint is invalid or there is no tokenizer to build the vocabulary from."""
    source = grammar_source(params)
    if source is None:
        return None
    field = params.structured[0]  # type: ignore[index]
    if tokenizer is None:
        raise ParameterError(field, None, "used with a tokenizer",
                             f"{field} needs the engine's tokenizer; create it with Engine(model, config, tokenizer=...)")
    return GrammarMatcher(grammar_vocabulary(tokenizer, vocab_size), source, field)


def num_live_matchers() -> int:
    """How many grammar states are still alive (for leak checks)."""
    return len(_live_matchers)


_DISALLOWED_BITS: dict[torch.device, torch.Tensor] = {}


def _disallowed_bits(device: torch.device) -> torch.Tensor:
    """[256, 8] bool: for each byte value, which of its bits (lowest first) are 0."""
    table = _DISALLOWED_BITS.get(device)
    if table is None:
        values = torch.arange(256, dtype=torch.int32)
        table = _DISALLOWED_BITS[device] = (((values[:, None] >> torch.arange(8, dtype=torch.int32)) & 1) == 0).to(device)
    return table


@dataclass
class GrammarMask:
    """The tokens the rows that follow a grammar may not take: `disallowed` [len(rows), vocab] bool on
    the device; `rows` [len(rows)] long, the batch rows they belong to (None: every row, in order)."""

    rows: torch.Tensor | None
    disallowed: torch.Tensor

    @classmethod
    def build(
        cls, matchers: Sequence[GrammarMatcher | None], vocab_size: int | None, device: torch.device
    ) -> GrammarMask | None:
        """The mask of the rows whose matcher is not None (None when no row has one). The masks are
        filled on the CPU (in parallel across rows), moved to the device in one copy and unpacked there."""
        rows = [(row, m) for row, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        vocabulary = rows[0][1].vocabulary
        vocab_size = vocab_size or vocabulary.vocab_size
        words = vocabulary.words
        packed = np.full((len(rows), words), -1, dtype=np.int32)  # [n, words]: bit t % 32 of word t // 32
        pairs = [(m.llg_matcher, i) for i, (_, m) in enumerate(rows)]
        if len(pairs) == 1 or vocabulary.executor is None:
            for matcher, i in pairs:
                matcher.unsafe_compute_mask_ptr(packed[i].ctypes.data, words * 4)
        else:
            vocabulary.executor.unsafe_compute_mask_ptr(pairs, packed.ctypes.data, words * 4, len(rows))
        # little-endian words: token t is bit t % 8 of byte t // 8
        if torch.device(device).type == "cpu":
            disallowed = torch.from_numpy(np.unpackbits(~packed.view(np.uint8), axis=1, bitorder="little").view(bool))
        else:  # the packed bits cross in one copy and are unpacked on the device
            packed_bytes = torch.from_numpy(packed.view(np.uint8)).to(device)  # [n, words * 4]
            disallowed = _disallowed_bits(device)[packed_bytes.long()].view(len(rows), words * 32)
        if disallowed.shape[1] < vocab_size:  # logits wider than the grammar's vocabulary: the rest is never allowed
            disallowed = torch.nn.functional.pad(disallowed, (0, vocab_size - disallowed.shape[1]), value=True)
        disallowed = disallowed[:, :vocab_size]
        if len(rows) == len(matchers):
            return cls(None, disallowed)
        return cls(torch.tensor([row for row, _ in rows], dtype=torch.long, device=device), disallowed)

    def allowed_ids(self, index: int) -> list[int]:
        """The token ids the `index`-th grammar row may take (for tests and debugging)."""
        return (~self.disallowed[index]).nonzero()[:, 0].tolist()


def apply_grammar_mask(logits: torch.Tensor, mask: GrammarMask) -> torch.Tensor:
    """-inf where a grammar row's token is not allowed; other rows unchanged."""
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    if mask.rows is None:
        return torch.where(mask.disallowed, neg_inf, logits)
    return logits.index_put((mask.rows,), torch.where(mask.disallowed, neg_inf, logits[mask.rows]))
