"""Incremental detokenization: deltas join into the full decode and never split a character."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenloom.detokenizer import IncrementalDetokenizer
from tokenloom.loading.checkpoint import ModelSource
from tokenloom.tokenizer import Tokenizer

TEXTS = [
    "你好，世界！今天天气很好。",
    "我喜欢用Python写代码，也喜欢喝茶。",
    "😀🎉👍🚀🔥",
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👍🏽 thumbs",
    "日本語のテキスト、カタカナとひらがな。",
    "한국어 문장입니다.",
    "Mixed 中文 and English with emoji 🤖 inside.",
    "math ∑∫√∞ ≠ ≤ ≥ and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕋𝕖𝕩𝕥",
    "Ünïcödé café naïve résumé",
    "Ελληνικά και русский текст",
    "עברית ועربية",
    "def f(x):\n    return x * 2  # 注释\n",
    "   leading and trailing spaces   ",
    "\n\n\ttabs and newlines\n",
    "<|im_start|>assistant\n答：是的<|im_end|>",
    "special <|im_end|> in the middle 😀",
    "a",
    "🇯🇵🇨🇳🇺🇸",
    "€100 → ¥15000 ≈ £85",
    "emoji at the end 🎉",
]


@pytest.fixture(scope="module")
def tokenizer(hf_smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_source(ModelSource(kind="hf", path=hf_smollm2_dir))


def _stream(tokenizer: Tokenizer, ids: list[int], prompt_ids: list[int] | None, skip: bool) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip)
    deltas = [detok.push(token_id) for token_id in ids]
    deltas.append(detok.flush())
    assert detok.token_ids == ids
    assert detok.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_join_to_full_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    prompt = tokenizer.encode("<|im_start|>user\n写一首诗<|im_end|>\n<|im_start|>assistant\n")
    for skip in (False, True):
        expected = tokenizer.decode(ids, skip_special_tokens=skip)
        for prompt_ids in (None, prompt):
            deltas = _stream(tokenizer, ids, prompt_ids, skip)
            assert "".join(deltas) == expected
            for delta in deltas:
                assert "\ufffd" not in delta
                delta.encode("utf-8")  # valid text: no lone surrogates


def test_multibyte_characters_are_held_back(tokenizer):
    ids = tokenizer.encode("你好😀")
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "the test needs characters split across tokens"
    detok = IncrementalDetokenizer(tokenizer, None, skip_special_tokens=False)
    deltas = [detok.push(i) for i in ids]
    assert "" in deltas and "".join(deltas) == "你好😀"


def test_flush_releases_an_incomplete_character(tokenizer):
    ids = tokenizer.encode("好😀")
    detok = IncrementalDetokenizer(tokenizer, None, skip_special_tokens=False)
    text = "".join(detok.push(i) for i in ids[:-1])
    tail = detok.flush()
    assert text + tail == tokenizer.decode(ids[:-1])
    assert tail.endswith("\ufffd")
    assert detok.flush() == ""


def test_push_many_and_prompt_ending_mid_character(tokenizer):
    ids = tokenizer.encode("混合 text 🎉 end")
    detok = IncrementalDetokenizer(tokenizer, None, skip_special_tokens=False)
    assert detok.push_many(ids[:3]) + detok.push_many(ids[3:]) + detok.flush() == tokenizer.decode(ids)
    split = tokenizer.encode("😀")
    assert len(split) > 1
    # a prompt that ends inside a character is not used as context
    detok = IncrementalDetokenizer(tokenizer, split[:-1], skip_special_tokens=False)
    assert "".join(detok.push(i) for i in ids) + detok.flush() == tokenizer.decode(ids)


# ---- stop strings: hold-back and matching ---------------------------------------------------------


class PieceTokenizer:
    """Token id i decodes to PIECES[i]; a decode is the plain concatenation (no neighbour rules)."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.pieces[i] for i in ids)


def _run(pieces: list[str], stop: list[str], include: bool = False) -> tuple[list[str], IncrementalDetokenizer]:
    tok = PieceTokenizer(pieces)
    detok = IncrementalDetokenizer(tok, None, stop=stop, include_stop_str_in_output=include)
    deltas = [detok.push(i) for i in range(len(pieces))]
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.text
    return deltas, detok


@pytest.mark.parametrize(
    ("pieces", "stop", "include", "deltas", "match"),
    [
        # a possible start is held, then released when the next piece rules the match out
        (["x", "a", "b", "d"], ["abc"], False, ["x", "", "", "abd", ""], None),
        # a match spanning three pieces: nothing of it is ever released
        (["x", "a", "b", "c", "y"], ["abc"], False, ["x", "", "", "", "", ""], "abc"),
        (["x", "a", "b", "c", "y"], ["abc"], True, ["x", "", "", "abc", "", ""], "abc"),
        # held until the end of the stream, then flushed
        (["x", "a"], ["abc"], False, ["x", "", "a"], None),
        # only the tail that can still begin a match is held: "aaa" may end in the start of "aab"
        (["a", "a", "a", "b"], ["aab"], False, ["", "", "a", "", ""], "aab"),
        # the match sits inside one piece, with text after it
        (["hello STOP world"], ["STOP"], False, ["hello ", ""], "STOP"),
        # the stop string that is complete first wins, whatever the list order
        (["abcde"], ["abcde", "cd"], False, ["ab", ""], "cd"),
        (["ab", "cd", "e"], ["abcde", "cd"], False, ["", "ab", "", ""], "cd"),
        # complete at the same place: the longer one (its text holds no stop string either)
        (["xabc"], ["bc", "abc"], False, ["x", ""], "abc"),
        # pieces after a match release nothing
        (["S", "T", "more"], ["ST"], False, ["", "", "", ""], "ST"),
    ],
)
def test_stop_strings_hand_built(pieces, stop, include, deltas, match):
    got, detok = _run(pieces, stop, include)
    assert got == deltas
    assert detok.stop_match == match


def _first_stop(text: str, stop: list[str]) -> tuple[int, int, str] | None:
    """Brute force, character by character: the first end position where a stop string is
    complete (the longest one there). Returns (start, end, string)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stop if text[:end].endswith(s)]
        if done:
            s = max(done, key=len)
            return end - len(s), end, s
    return None


def test_stop_strings_random_against_brute_force():
    import random

    rng = random.Random(0)
    for _ in range(400):
        text = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, max(0, len(text) - 1)))) if len(text) > 1 else []
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)]) if text[i:j]]
        stop = ["".join(rng.choice("abc ") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        include = rng.random() < 0.5
        deltas, detok = _run(pieces, stop, include)
        expected = _first_stop("".join(pieces), stop)
        if expected is None:
            assert detok.text == "".join(pieces) and detok.stop_match is None
        else:
            start, end, s = expected
            assert detok.text == "".join(pieces)[: end if include else start]
            assert detok.stop_match == s
        # Whatever was released before the end never reaches into text that a match later cut.
        released = ""
        for delta in deltas:
            released += delta
            assert detok.text.startswith(released)


def test_stop_strings_need_non_empty_strings():
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(PieceTokenizer(["a"]), None, stop=["ok", ""])


def test_stop_string_on_real_tokenizer_spanning_tokens_and_characters(tokenizer):
    text = "我喜欢用Python写代码 😀🎉 and more text here"
    ids = tokenizer.encode(text)
    full = tokenizer.decode(ids)
    # A stop string that starts inside a multi-token emoji run and crosses into the next word.
    stop = "🎉 and"
    index = full.index(stop)
    for include in (False, True):
        detok = IncrementalDetokenizer(tokenizer, None, stop=[stop], include_stop_str_in_output=include)
        deltas = [detok.push(i) for i in ids]
        deltas.append(detok.flush())
        assert detok.stop_match == stop
        assert "".join(deltas) == full[: index + len(stop) if include else index]
        for delta in deltas:
            assert "\ufffd" not in delta
            if not include:
                assert "🎉" not in delta


def test_real_tokenizer_prefix_of_a_stop_string_is_released_at_the_end(tokenizer):
    ids = tokenizer.encode("Tea or coffee? Coffee")
    detok = IncrementalDetokenizer(tokenizer, None, stop=["Coffee please"])
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) == "Tea or coffee? "  # "Coffee" could still begin the stop string
    assert detok.flush() == "Coffee" and detok.stop_match is None
