"""The BPE vocabulary and merges a GGUF file's tokenizer metadata implies (L3, no torch): the tokens
respelled in GPT-2's byte alphabet for byte-level vocabularies, the file's merges parsed, or the merges
rebuilt from the vocabulary as transformers' `generate_merges` does when the file has none. This is the
slow part of a tokenizer rebuild (seconds for Gemma 3's 262k tokens), which `tokenizer_cache` keeps.
"""

from __future__ import annotations

import operator
import re
from functools import lru_cache
from itertools import repeat
from typing import Any

from tokenloom.errors import TokenizerError
from tokenloom.loading.gguf_arrays import GGUFStrings


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table for byte-level BPE vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


# The merge rebuild slices every token at every position: sum(len * (len - 1)) characters. Gemma 3's
# 262k vocabulary needs 9.3M; a crafted one ('a', 'aa', ... 2000 long) 2.7G and ~2M merges.
MAX_MERGE_REBUILD_CHARS = 64_000_000


def generate_merges(
    vocab: dict[str, int], vocab_scores: dict[str, float] | None = None
) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary (transformers' `generate_merges`): every split of a token into
    two vocabulary tokens, ordered by the token's score (best first) or by id when there are no scores.
    Refuses (TokenizerError) a vocabulary whose rebuild would slice more than MAX_MERGE_REBUILD_CHARS
    characters, before starting."""
    work = sum(len(token) * (len(token) - 1) for token in vocab)
    if work > MAX_MERGE_REBUILD_CHARS:
        longest = max(vocab, key=len)
        raise TokenizerError(
            f"rebuilding BPE merges from this vocabulary of {len(vocab)} tokens would slice {work} characters "
            f"(limit MAX_MERGE_REBUILD_CHARS={MAX_MERGE_REBUILD_CHARS}); its longest token has {len(longest)} "
            "characters, real vocabularies' a few dozen",
        )
    reverse = vocab_scores is not None
    scores = dict(vocab_scores) if vocab_scores is not None else vocab
    # a half in the vocabulary as its key object (one lookup, as `in` is): see `parsed_merges`
    canonical = dict(zip(vocab, vocab)).get
    merges: list[tuple[str, str, float]] = []
    for merge, score in scores.items():
        local = []
        for i in range(1, len(merge)):
            left = canonical(merge[:i])
            if left is not None:
                right = canonical(merge[i:])
                if right is not None:
                    local.append((left, right, score))
        if len(local) > 1:
            local.sort(key=lambda item: (vocab[item[0]], vocab[item[1]]))
        merges.extend(local)
    merges.sort(key=lambda item: (item[2], len(item[0]), len(item[1])), reverse=reverse)
    return [(left, right) for left, right, _ in merges]


def file_merges(
    md: dict[str, Any],
    tokens: list[str],
    vocab_scores: dict[str, float] | None = None,
    vocab: dict[str, int] | None = None,
) -> list[tuple[str, str]]:
    """The file's merges (tokenizer.ggml.merges), or ones rebuilt from `tokens` and their scores
    (`vocab_scores`, else tokenizer.ggml.scores, else the token order). The file's merges are spelled
    with `vocab`'s own string objects where it holds them (see `parsed_merges`)."""
    if "tokenizer.ggml.merges" in md:
        merges = md["tokenizer.ggml.merges"]
        return parsed_merges(merges.tolist() if isinstance(merges, GGUFStrings) else merges, vocab)
    if vocab_scores is None and "tokenizer.ggml.scores" in md:
        vocab_scores = dict(zip(tokens, md["tokenizer.ggml.scores"], strict=False))
    return generate_merges(dict(zip(tokens, range(len(tokens)))), vocab_scores)  # a later duplicate wins


@lru_cache(maxsize=1)
def _outside_byte_alphabet() -> re.Pattern[str]:
    return re.compile("[^" + "".join(map(re.escape, sorted(bytes_to_unicode().values()))) + "]")


def byte_level_vocab(tokens: list[str]) -> dict[str, int]:
    """Token -> id of a byte-level vocabulary, each token spelled in GPT-2's byte alphabet (a token
    outside it is respelled from its UTF-8 bytes); a later duplicate wins, as in a dict display."""
    if _outside_byte_alphabet().search("".join(tokens)) is None:  # every token already is (one C scan)
        return dict(zip(tokens, range(len(tokens))))
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    return {
        token if set(token) <= alphabet else "".join(spelling[byte] for byte in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }


def parsed_merges(merges: list[str], vocab: dict[str, int] | None = None) -> list[tuple[str, str]]:
    """`left right` strings -> pairs; a merge that is not two tokens separated by one space is a
    TokenizerError naming it. With `vocab`, a half it holds is its key object rather than an equal
    copy: the derived-tokenizer cache then stores each string once, without building new pairs."""
    # The common case at C speed: every merge holds a space and all of them hold as many spaces as
    # there are merges, so each holds exactly one, and no half is empty.
    halves = " ".join(merges).split(" ")
    if len(halves) == 2 * len(merges) and all(map(operator.contains, merges, repeat(" "))) and "" not in halves:
        if vocab is not None:
            canonical = dict(zip(vocab, vocab)).get
            halves = list(map(canonical, halves, halves))
        return list(zip(halves[0::2], halves[1::2]))
    parsed = []
    for index, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise TokenizerError(
                f"tokenizer.ggml.merges[{index}] = {merge[:80]!r} is not two tokens separated by one space"
            )
        parsed.append((parts[0], parts[1]))
    return parsed
