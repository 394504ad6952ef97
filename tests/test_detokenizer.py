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
