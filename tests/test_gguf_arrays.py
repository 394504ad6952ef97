"""The vocabulary arrays of a GGUF header (`GGUFStrings`): checked when the header is parsed, exactly as
the element-by-element parse checks them, and built into Python strings only when read."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import pytest

from tokenloom.errors import GGUFFormatError
from tokenloom.loading import gguf_reader
from tokenloom.loading.gguf_arrays import GGUFStrings
from tokenloom.loading.gguf_reader import read_gguf

KEY = "tokenizer.ggml.tokens"


def _gguf(path: Path, items: list[bytes], *, cut: int = 0, key: str = KEY, count: int | None = None) -> Path:
    """A GGUF file with no tensors and two metadata keys: an array of strings (raw bytes each) and a
    scalar after it, so a wrong end position shows."""
    name = key.encode()
    body = b"".join(struct.pack("<Q", len(item)) + item for item in items)
    after = b"general.after"
    data = (b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + struct.pack("<Q", len(name)) + name
            + struct.pack("<IIQ", 9, 8, len(items) if count is None else count) + body
            + struct.pack("<Q", len(after)) + after + struct.pack("<II", 4, 7))  # fmt: skip
    path.write_bytes(data[: len(data) - cut] if cut else data)
    return path


def _eager_error(monkeypatch: pytest.MonkeyPatch, path: Path) -> str:
    """The message the element-by-element parse gives for `path`."""
    with monkeypatch.context() as patch:
        patch.setattr(gguf_reader, "LAZY_STRING_ARRAYS", frozenset())
        with pytest.raises(GGUFFormatError) as eager:
            read_gguf(path)
    return str(eager.value)


VALID = {
    "ascii": [b"a", b"hello", b"", b"x" * 300],
    "multibyte": ["\u00e9t\u00e9".encode(), "\u4e2d\u6587".encode(), "\U0001f600".encode(), b"", b"plain"],
    "nuls": [b"a\x00b", b"\x00", b"", b"\x00" * 9, "\u00e9\x00".encode()],
    "long_lengths": [b"y" * 128, b"z" * 256, "\u00fc".encode() * 200, b"k" * 70000],
    "empty": [],
    "one_empty": [b""],
}


@pytest.mark.parametrize("case", sorted(VALID))
def test_lazy_strings_equal_the_eager_parse(tmp_path: Path, case: str) -> None:
    items = VALID[case]
    parsed = read_gguf(_gguf(tmp_path / f"{case}.gguf", items))
    tokens = parsed.metadata[KEY]
    assert isinstance(tokens, GGUFStrings)
    assert parsed.metadata["general.after"] == 7  # the parse went on from the array's end
    expected = [item.decode() for item in items]
    assert len(tokens) == len(expected)
    assert [tokens[i] for i in range(len(expected))] == expected  # one element at a time, unbuilt
    assert [tokens[-i - 1] for i in range(len(expected))] == expected[::-1]
    assert tokens._items is None
    assert tokens == expected and expected == tokens and tokens.tolist() == expected
    assert list(tokens) == expected and tokens[1:3] == expected[1:3] and repr(tokens) == repr(expected)
    assert [tokens[i] for i in range(len(expected))] == expected  # built now
    assert pickle.loads(pickle.dumps(tokens)) == expected


def test_lazy_strings_behave_like_a_list(tmp_path: Path) -> None:
    tokens = read_gguf(_gguf(tmp_path / "t.gguf", [b"a", b"b", b"a"])).metadata[KEY]
    with pytest.raises(IndexError):
        tokens[3]
    with pytest.raises(TypeError):
        tokens["a"]
    assert "b" in tokens and "c" not in tokens and tokens.index("b") == 1 and tokens.count("a") == 2
    assert tokens != ["a", "b"] and tokens != "ab" and bool(tokens)
    with pytest.raises(TypeError):
        hash(tokens)


INVALID = {
    "latin1": [b"a", "\u00e9t\u00e9".encode("latin-1")],
    "cut_sequence_at_the_end": [b"ok", "\u4e2d".encode()[:2], b"next"],
    "continuation_first": [b"\x80abc"],
    "surrogate": [b"ok", b"\xed\xa0\x80"],
    "overlong": [b"\xc0\x80"],
    "last_element": [b"a", b"b", b"\xff"],
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_utf8_fails_the_parse_naming_the_element(tmp_path: Path, monkeypatch, case: str) -> None:
    path = _gguf(tmp_path / f"{case}.gguf", INVALID[case])
    with pytest.raises(GGUFFormatError, match="is not valid UTF-8") as lazy:
        read_gguf(path)
    assert str(lazy.value) == _eager_error(monkeypatch, path)


@pytest.mark.parametrize("cut", [1, 3, 17, 18, 27, 40])
def test_truncated_arrays_fail_as_the_eager_parse_does(tmp_path: Path, monkeypatch, cut: int) -> None:
    items = [b"abc" * 9, b"de" * 9, "\u00e9".encode() * 9]  # long enough for the count check to pass
    path = tmp_path / "cut.gguf"
    data = _gguf(tmp_path / "whole.gguf", items).read_bytes()
    tail = len(b"general.after") + 8 + 8  # the scalar key after the array
    path.write_bytes(data[: len(data) - tail - cut])
    with pytest.raises(GGUFFormatError, match="truncated GGUF file") as lazy:
        read_gguf(path)
    assert str(lazy.value) == _eager_error(monkeypatch, path)


def test_a_length_past_the_file_fails_as_the_eager_parse_does(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "huge.gguf"
    path.write_bytes(
        b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(KEY)) + KEY.encode()
        + struct.pack("<IIQ", 9, 8, 2) + struct.pack("<Q", 1) + b"a" + struct.pack("<Q", 1 << 62) + b"b" * 16
    )  # fmt: skip
    with pytest.raises(GGUFFormatError, match="truncated GGUF file") as lazy:
        read_gguf(path)
    assert str(lazy.value) == _eager_error(monkeypatch, path)


def test_other_string_arrays_stay_lists(tmp_path: Path) -> None:
    parsed = read_gguf(_gguf(tmp_path / "tags.gguf", [b"a", b"b"], key="general.tags"))
    assert type(parsed.metadata["general.tags"]) is list


def test_the_model_loader_never_builds_the_vocabulary(tmp_path: Path) -> None:
    from tests.tiny_gguf import write_tiny_gguf_with_tokenizer
    from tokenloom.loading.gguf_cache import clear_cache, parsed_gguf
    from tokenloom.loading.gguf_loader import load_gguf_checkpoint

    path = write_tiny_gguf_with_tokenizer(tmp_path, "llama")
    clear_cache()
    checkpoint = load_gguf_checkpoint(path)
    metadata = parsed_gguf(path).metadata
    assert checkpoint.config["vocab_size"] > 0
    assert isinstance(metadata[KEY], GGUFStrings) and metadata[KEY]._items is None
    assert isinstance(metadata["tokenizer.ggml.merges"], GGUFStrings)
    assert metadata["tokenizer.ggml.merges"]._items is None


# ---------------------------------------------------------------- layouts of an earlier parse


def _no_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenloom.loading import gguf_arrays

    monkeypatch.setattr(gguf_arrays, "_walk", lambda *_: pytest.fail("the length fields were walked"))


@pytest.mark.parametrize("case", sorted(VALID))
def test_a_layout_spares_the_walk_and_changes_nothing(tmp_path: Path, monkeypatch, case: str) -> None:
    path = _gguf(tmp_path / f"{case}.gguf", VALID[case])
    walked = read_gguf(path)
    layout = walked.layout()
    assert set(layout) == {KEY} and layout[KEY].tolist() == [len(item) for item in VALID[case]]
    with monkeypatch.context() as patch:
        if VALID[case]:
            _no_walk(patch)
        hinted = read_gguf(path, layout)
    assert hinted.metadata == walked.metadata and hinted.metadata["general.after"] == 7
    assert (hinted.metadata[KEY]._starts == walked.metadata[KEY]._starts).all()
    assert (hinted.metadata[KEY]._ends == walked.metadata[KEY]._ends).all()


def test_a_layout_that_does_not_fit_the_file_is_ignored(tmp_path: Path) -> None:
    import numpy as np

    items = [b"abc", b"", "\u00e9".encode(), b"xyz" * 50]
    path = _gguf(tmp_path / "t.gguf", items)
    expected = read_gguf(path).metadata
    good = np.array([len(item) for item in items], dtype=np.uint64)
    wrong = [
        good[:-1],  # another count
        good[::-1].copy(),  # the same lengths, in another order
        good + np.uint64(1),
        np.array([0, 0, 0, sum(map(len, items)) + 24], dtype=np.uint64),  # the same end, other fields
        np.array([1 << 63, 0, 0, 0], dtype=np.uint64),
        good.astype(np.int64),  # another type
        good.reshape(2, 2),
    ]
    for lengths in wrong:
        assert read_gguf(path, {KEY: lengths}).metadata == expected


def test_a_layout_does_not_hide_a_malformed_array(tmp_path: Path, monkeypatch) -> None:
    import numpy as np

    latin1 = _gguf(tmp_path / "latin1.gguf", INVALID["latin1"])
    lengths = np.array([len(item) for item in INVALID["latin1"]], dtype=np.uint64)
    with pytest.raises(GGUFFormatError) as hinted:
        read_gguf(latin1, {KEY: lengths})
    assert str(hinted.value) == _eager_error(monkeypatch, latin1)
    items = [b"abc" * 9, b"de" * 9, b"fg" * 9]
    whole = _gguf(tmp_path / "whole.gguf", items).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) - 40])
    with pytest.raises(GGUFFormatError, match="truncated") as hinted:
        read_gguf(cut, {KEY: np.array([27, 18, 18], dtype=np.uint64)})
    assert str(hinted.value) == _eager_error(monkeypatch, cut)
