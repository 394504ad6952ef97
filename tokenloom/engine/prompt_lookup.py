"""Prompt lookup: propose the tokens that followed an earlier occurrence of the sequence's last n-gram
(L1: pure Python on token ids). transformers' PromptLookupCandidateGenerator, vLLM's ngram proposer."""

from __future__ import annotations

from collections.abc import Sequence


def prompt_lookup(token_ids: Sequence[int], num_tokens: int, min_ngram: int = 1, max_ngram: int = 3) -> list[int]:
    """Up to `num_tokens` proposed next tokens: for n from `max_ngram` down to `min_ngram`, find the first
    earlier occurrence of the last n tokens that is followed by at least one token and propose what
    followed it (as transformers does: the earliest match, a longer n-gram first). [] when none matches."""
    length = len(token_ids)
    if num_tokens < 1:
        return []
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix = list(token_ids[length - n :])
        first = suffix[0]
        start = 0
        # candidates end before the last token, so at least one token follows the match
        last_start = length - n - 1
        while start <= last_start:
            try:
                index = token_ids.index(first, start, last_start + 1)  # type: ignore[call-arg]
            except ValueError:
                break
            if list(token_ids[index : index + n]) == suffix:
                end = min(index + n + num_tokens, length)
                return list(token_ids[index + n : end])
            start = index + 1
    return []
