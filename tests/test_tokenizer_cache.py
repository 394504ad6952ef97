"""The derived-tokenizer cache (`tokenloom.loading.tokenizer_cache`): a cached load builds exactly the
tokenizer a first load builds, entries are written atomically, a damaged entry is ignored and rewritten,
an unwritable directory only means nothing is cached, and a malformed file is refused as before."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from tests import tiny_models
from tests.prompts import BATCH_PROMPTS, GREEDY_PROMPTS, LOGIT_PROMPTS
from tests.tiny_gguf import write_tiny_gguf_with_tokenizer
from tokenloom.errors import TokenizerError
from tokenloom.loading import gguf_tokenizer, tokenizer_cache
from tokenloom.loading.gguf_cache import clear_cache
from tokenloom.loading.gguf_tokenizer import load_gguf_tokenizer
from tokenloom.tokenizer import Tokenizer

CORPUS = [
    *LOGIT_PROMPTS,
    *GREEDY_PROMPTS,
    *BATCH_PROMPTS,
    "Hello, world!",
    "你好，世界！这是一个测试。",
    "Emoji: 😀🎉👍🏽 and a flag 🇫🇷",
    "Здравствуй, мир. Ünïcödé àccents: café naïve. مرحبا بالعالم. नमस्ते दुनिया. こんにちは世界",
    "   leading spaces",
    "trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nend\r\n",
    "multiple     spaces    inside",
    "I'm sure they'll say it's fine, won't they?",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|im_start|><|im_end|>",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n<bos><eos><pad><mask><unk>",
    "",
    " ",
    "\x00\x01\x7f\u200b\ufeff",
    "Numbers 1234567890 and 3.14159 and 1e-9",
]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name three fruits. 🍎"},
    {"role": "assistant", "content": "Apple, pear, plum."},
    {"role": "user", "content": "Und auf Deutsch?"},
]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache directory of the test's own (the user's cache is left alone)."""
    directory = tmp_path / "cache" / "tokenizers"
    monkeypatch.setattr(tokenizer_cache, "cache_dir", lambda: directory)
    clear_cache()
    return directory


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_case() -> tuple[dict, dict]:
    """tiny_models' random llama with a byte-level vocabulary, control and user-defined tokens."""
    import numpy as np

    kv, tensors = tiny_models._decoder_case("llama", np.random.default_rng(0))
    tokens = [chr(c) for c in [*range(33, 127), *range(161, 173)]][: tiny_models.VOCAB]
    tokens[-1] = tokens[3] + tokens[4]
    tokens[-4:-1] = ["<tool>", "<|im_start|>", "<|im_end|>"]
    types = [1] * len(tokens)
    types[-4], types[-3], types[-2] = 4, 3, 3
    kv |= {
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": [f"{tokens[3]} {tokens[4]}"],
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": CHATML,
    }
    return kv, tensors


@pytest.fixture
def tiny(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny GGUF whose tokenizer is cached (the size threshold lowered for it)."""
    monkeypatch.setattr(tokenizer_cache, "MIN_CACHED_TOKENS", 0)
    return tiny_models.write_gguf(tmp_path / "tiny.gguf", "llama", *_tiny_case())


def _entries(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.bpe")) if directory.is_dir() else []


def _no_derivation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if the vocabulary or merges are derived again (a cache hit must not)."""

    def fail(*_: object) -> None:
        pytest.fail("the vocabulary was derived again instead of read from the cache")

    monkeypatch.setattr(gguf_tokenizer, "file_merges", fail)
    monkeypatch.setattr(gguf_tokenizer, "byte_level_vocab", fail)


def _assert_equivalent(first, second, texts: list[str]) -> None:
    """Every TokenizerData field, the serialized tokenizer, and encode / decode / chat rendering."""
    assert first.tokenizer.to_str() == second.tokenizer.to_str()
    for field in dataclasses.fields(first):
        if field.name != "tokenizer":
            assert getattr(first, field.name) == getattr(second, field.name), field.name
    a, b = Tokenizer(first), Tokenizer(second)
    for text in texts:
        for add_special in (True, False):
            ids = a.encode(text, add_special_tokens=add_special)
            assert ids == b.encode(text, add_special_tokens=add_special), (text, add_special)
            for skip in (False, True):
                assert a.decode(ids, skip_special_tokens=skip) == b.decode(ids, skip_special_tokens=skip)
    assert a.get_vocab() == b.get_vocab() and a.special_token_ids == b.special_token_ids
    assert a.all_special_tokens == b.all_special_tokens and a.end_of_turn_token_ids() == b.end_of_turn_token_ids()
    if a.chat_template is not None:
        for generation_prompt in (False, True):
            rendered = a.apply_chat_template(MESSAGES, add_generation_prompt=generation_prompt)
            assert rendered == b.apply_chat_template(MESSAGES, add_generation_prompt=generation_prompt)
            assert a.encode(rendered, add_special_tokens=False) == b.encode(rendered, add_special_tokens=False)


def _first_then_cached(path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch):
    clear_cache()
    first = load_gguf_tokenizer(path)
    assert len(_entries(cache)) == 1
    clear_cache()
    with monkeypatch.context() as patch:
        _no_derivation(patch)
        cached = load_gguf_tokenizer(path)
    return first, cached


def test_smollm2_cached_equals_first_load(smollm2_gguf: Path, cache: Path, monkeypatch) -> None:
    first, cached = _first_then_cached(smollm2_gguf, cache, monkeypatch)
    _assert_equivalent(first, cached, CORPUS)
    with monkeypatch.context() as patch:  # and both equal a build that never touches the cache
        patch.setattr(tokenizer_cache, "MIN_CACHED_TOKENS", 1 << 40)
        clear_cache()
        _assert_equivalent(load_gguf_tokenizer(smollm2_gguf), cached, CORPUS)


@pytest.mark.slow
def test_gemma3_cached_equals_first_load(cache: Path, monkeypatch) -> None:
    try:
        from tokenloom.loading.pull import pull

        path = pull("gemma3-270m", progress=False)
    except Exception as exc:  # noqa: BLE001 - any failure means the file is not available here
        pytest.skip(f"gemma3-270m GGUF not available: {exc}")
    first, cached = _first_then_cached(path, cache, monkeypatch)
    _assert_equivalent(first, cached, CORPUS)


def test_tiny_cached_equals_first_load(tiny: Path, cache: Path, monkeypatch) -> None:
    first, cached = _first_then_cached(tiny, cache, monkeypatch)
    _assert_equivalent(first, cached, CORPUS)


def test_the_default_directory_is_under_tokenloom_home(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TOKENLOOM_HOME", str(tmp_path / "home"))
    assert tokenizer_cache.cache_dir() == tmp_path / "home" / "tokenizers"


def test_small_vocabularies_are_not_cached(tmp_path: Path, cache: Path) -> None:
    load_gguf_tokenizer(write_tiny_gguf_with_tokenizer(tmp_path, "llama"))
    assert not cache.exists() or list(cache.iterdir()) == []


def test_the_header_layout_is_kept_and_used(tiny: Path, cache: Path, monkeypatch) -> None:
    from tokenloom.loading import gguf_arrays
    from tokenloom.loading.gguf_cache import parsed_gguf

    walked = parsed_gguf(tiny).metadata
    (layout,) = cache.glob("*.layout")
    clear_cache()
    with monkeypatch.context() as patch:
        patch.setattr(gguf_arrays, "_walk", lambda *_: pytest.fail("the length fields were walked"))
        assert parsed_gguf(tiny).metadata == walked
    blob = layout.read_bytes()
    layout.write_bytes(blob[:-3])  # damaged: ignored, walked again and rewritten
    clear_cache()
    assert parsed_gguf(tiny).metadata == walked
    assert layout.read_bytes() == blob


@pytest.mark.parametrize(
    "damage", ["truncated", "flipped_byte", "empty", "garbage", "wrong_key", "bad_payload", "wrong_types"]
)
def test_a_damaged_entry_is_ignored_and_rewritten(tiny: Path, cache: Path, monkeypatch, damage: str) -> None:
    import hashlib
    import marshal

    first = load_gguf_tokenizer(tiny)
    (entry,) = _entries(cache)
    blob = entry.read_bytes()
    header = len(tokenizer_cache._MAGIC) + 32

    def sealed(payload: bytes) -> bytes:  # a sound checksum over a payload that is not an entry
        return tokenizer_cache._MAGIC + hashlib.sha256(payload).digest() + payload

    key = marshal.loads(blob[header:])[1]
    entry.write_bytes({
        "wrong_types": sealed(marshal.dumps((tokenizer_cache.FORMAT_VERSION, key, {1: "a"}, [("a",), 5]))),
        "truncated": blob[: len(blob) // 2],
        "flipped_byte": blob[:-5] + bytes([blob[-5] ^ 0x40]) + blob[-4:],
        "empty": b"",
        "garbage": os.urandom(len(blob)),
        "wrong_key": sealed(marshal.dumps((tokenizer_cache.FORMAT_VERSION, "0" * 64, {}, []))),
        "bad_payload": sealed(b"\xff\x00 not marshal"),
    }[damage])
    assert blob[header:] != entry.read_bytes()[header:]
    clear_cache()
    rebuilt = load_gguf_tokenizer(tiny)
    _assert_equivalent(first, rebuilt, CORPUS[:8])
    assert entry.read_bytes() == blob  # rewritten whole
    clear_cache()
    with monkeypatch.context() as patch:
        _no_derivation(patch)
        _assert_equivalent(first, load_gguf_tokenizer(tiny), CORPUS[:8])


def test_an_unwritable_directory_skips_caching(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("a file where the cache directory would be")
    monkeypatch.setattr(tokenizer_cache, "cache_dir", lambda: blocker / "tokenizers")
    first = load_gguf_tokenizer(tiny)
    clear_cache()
    _assert_equivalent(first, load_gguf_tokenizer(tiny), CORPUS[:8])
    assert blocker.read_text().startswith("a file")


def test_a_failed_write_leaves_no_temporary_file(tiny: Path, cache: Path, monkeypatch) -> None:
    def refuse(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tokenizer_cache.os, "replace", refuse)
    load_gguf_tokenizer(tiny)
    assert list(cache.iterdir()) == []
    monkeypatch.undo()


def test_writes_go_through_a_temporary_file(tiny: Path, cache: Path, monkeypatch) -> None:
    renames: list[tuple[str, str]] = []
    real = os.replace
    monkeypatch.setattr(tokenizer_cache.os, "replace", lambda a, b: renames.append((a, b)) or real(a, b))
    load_gguf_tokenizer(tiny)
    assert sorted(Path(target).suffix for _, target in renames) == [".bpe", ".layout"]  # tokenizer, header
    for source, _ in renames:
        assert Path(source).parent == cache and Path(source).name.endswith(".tmp") and not Path(source).exists()
    assert sorted(cache.iterdir()) == sorted(Path(target) for _, target in renames)


def test_the_key_follows_the_file_and_the_code(tiny: Path, cache: Path, monkeypatch) -> None:
    load_gguf_tokenizer(tiny)
    (before,) = _entries(cache)
    os.utime(tiny, ns=(tiny.stat().st_atime_ns, tiny.stat().st_mtime_ns + 1_000_000))  # touched
    clear_cache()
    load_gguf_tokenizer(tiny)
    assert len(_entries(cache)) == 2
    monkeypatch.setattr(tokenizer_cache, "code_version", lambda: "another builder")
    clear_cache()
    load_gguf_tokenizer(tiny)
    assert len(_entries(cache)) == 3 and before in _entries(cache)


def test_old_entries_are_pruned(tiny: Path, cache: Path, monkeypatch) -> None:
    monkeypatch.setattr(tokenizer_cache, "MAX_ENTRIES", 2)
    for version in range(4):
        monkeypatch.setattr(tokenizer_cache, "code_version", lambda v=version: f"builder {v}")
        load_gguf_tokenizer(tiny)
    assert len(_entries(cache)) == 2


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("tokenizer.ggml.merges", ["not-a-merge"], r"tokenizer.ggml.merges\[0\] = 'not-a-merge'"),
        ("tokenizer.ggml.merges", ["zz qq"], "out of vocabulary"),
        ("tokenizer.ggml.bos_token_id", "1", "tokenizer.ggml.bos_token_id must be an integer"),
    ],
)
def test_a_malformed_tokenizer_is_never_cached(tmp_path: Path, tiny: Path, cache: Path, key, value, message) -> None:
    kv, tensors = _tiny_case()
    kv[key] = value
    path = tiny_models.write_gguf(tmp_path / "bad.gguf", "llama", kv, tensors)
    for _ in range(2):
        clear_cache()
        with pytest.raises(TokenizerError, match=message):
            load_gguf_tokenizer(path)
    assert _entries(cache) == []


def test_the_metadata_checks_run_on_a_cache_hit(tiny: Path, cache: Path) -> None:
    """A file rewritten in place with the same size and modification time keys the same entry: the
    metadata checks still run on every load and refuse it."""
    load_gguf_tokenizer(tiny)
    stat = tiny.stat()
    data = tiny.read_bytes()
    key = b"tokenizer.ggml.add_bos_token"
    at = data.index(key) + len(key)
    assert data[at : at + 4] == (7).to_bytes(4, "little")  # a bool
    with tiny.open("r+b") as handle:  # the same inode, size and (restored) modification time
        handle.seek(at)
        handle.write((0).to_bytes(4, "little") + bytes([ord("y")]))  # a u8 of 121: not true or false
    os.utime(tiny, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert tiny.stat().st_ino == stat.st_ino and tiny.stat().st_size == stat.st_size
    clear_cache()
    with pytest.raises(TokenizerError, match="tokenizer.ggml.add_bos_token must be true or false"):
        load_gguf_tokenizer(tiny)


def test_the_file_merges_share_the_vocabulary_strings() -> None:
    """So that an entry stores each string once (marshal writes the repeats as references)."""
    from tokenloom.loading.gguf_vocab import parsed_merges

    left, right = "".join(["a", "b"]), "".join(["c", "d"])
    vocab = {left: 0, right: 1, left + right: 2}
    (merge,) = parsed_merges([f"{left} {right}"], vocab)
    assert merge == ("ab", "cd") and merge[0] is left and merge[1] is right
    assert parsed_merges(["ab cd"]) == [("ab", "cd")]
