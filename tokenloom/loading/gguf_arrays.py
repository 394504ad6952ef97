"""A GGUF metadata array of strings that is checked when the header is parsed and turned into Python
strings only when read (L3, no torch).

A vocabulary is 10^5 strings (SmolLM2: 49,152 tokens and 48,900 merges; Gemma 3: 262,144 tokens) and
building them is most of a header parse, yet the model loader never reads them and a tokenizer loaded
from the derived-tokenizer cache reads a handful. `GGUFStrings.parse` walks the element lengths (each
inside the file) and checks that every element is valid UTF-8 with one decode of the whole array, so a
malformed array fails the parse exactly as an eagerly built one does; `GGUFStrings` then builds one
element on `[i]` and all of them on the first iteration, slice or comparison.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import Any, overload

import numpy as np

_LENGTH = struct.Struct("<Q")


class GGUFStrings(Sequence[str]):
    """The strings of one metadata array, built on first use. Compares equal to the list it stands for."""

    __slots__ = ("_view", "_starts", "_ends", "_items")

    def __init__(self, view: memoryview, starts: np.ndarray, ends: np.ndarray) -> None:
        self._view = view  # the file's bytes; element i is view[starts[i]:ends[i]], valid UTF-8
        self._starts = starts
        self._ends = ends
        self._items: list[str] | None = None

    @classmethod
    def parse(
        cls, view: memoryview, pos: int, count: int, lengths: np.ndarray | None = None
    ) -> tuple[GGUFStrings, int] | None:
        """The `count` strings stored from byte `pos` of `view`, and the position after them.

        `lengths`, the element lengths of an earlier parse of the file (`lengths()`), spare the walk
        along the length fields when every field holds what they say (checked at once; a stale or wrong
        one is ignored). Only the common case is handled here: every length inside the buffer and every
        element valid UTF-8. None otherwise: the reader's element-by-element parse then raises the error
        naming the element."""
        bounds = _bounds_from_lengths(view, pos, count, lengths) if lengths is not None else None
        if bounds is None:
            bounds = _walk(view, pos, count)
        if bounds is None:
            return None
        starts, ends = bounds
        end = int(ends[-1]) if count else pos
        if not _valid_utf8(view, pos, end, starts):
            return None
        return cls(view, starts, ends), end

    def lengths(self) -> np.ndarray:
        """The byte length of each element (uint64), for a later `parse` of the same file."""
        return (self._ends - self._starts).astype(np.uint64)

    def _all(self) -> list[str]:
        if self._items is None:
            self._items = _decode_all(self._view, self._starts, self._ends)
        return self._items

    def tolist(self) -> list[str]:
        """All the strings (the list is kept: later reads share it; do not modify it)."""
        return self._all()

    def __len__(self) -> int:
        return len(self._starts)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        count = len(self._starts)
        if self._items is None and type(index) is int and -count <= index < count:
            return str(self._view[int(self._starts[index]) : int(self._ends[index])], "utf-8")
        return self._all()[index]  # a slice, or the list's own IndexError / TypeError

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __contains__(self, value: object) -> bool:
        return value in self._all()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, GGUFStrings):
            return self._all() == other._all()
        if isinstance(other, list):
            return self._all() == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # a list is not hashable either

    def __repr__(self) -> str:
        return repr(self._all())

    def __reduce__(self) -> tuple[Any, ...]:
        return (list, (self._all(),))  # pickled / deep-copied as the list it stands for


def _walk(view: memoryview, pos: int, count: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(starts, ends) of the elements, following the length fields one by one; None if one of them
    or an element runs past the end of the buffer."""
    ends: list[int] = []
    append = ends.append
    length_at = _LENGTH.unpack_from
    end = pos
    try:
        for _ in range(count):  # the lengths chain: one Python step per element
            end += length_at(view, end)[0] + 8
            append(end)
    except (struct.error, OverflowError):  # a length field past the end of the buffer
        return None
    if end > len(view):  # the last element runs past the end of the buffer
        return None
    end_array = np.array(ends, dtype=np.int64)
    starts = np.empty_like(end_array)
    if count:
        starts[0] = pos + 8
        starts[1:] = end_array[:-1] + 8
    return starts, end_array


def _bounds_from_lengths(
    view: memoryview, pos: int, count: int, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """What `_walk` finds, from known element lengths: the bounds they imply, kept only if every
    length field in the buffer holds its element's length (so the walk would find the same)."""
    size = len(view)
    if lengths.dtype != np.uint64 or lengths.shape != (count,) or not count or int(lengths.max()) > size:
        return None
    ends = pos + np.cumsum(lengths.astype(np.int64) + 8)
    if int(ends[-1]) > size:
        return None
    starts = ends - lengths.astype(np.int64)
    fields = (starts - 8)[:, None] + np.arange(8)
    stored = np.frombuffer(view, dtype=np.uint8)[fields].view("<u8").ravel()
    if not np.array_equal(stored, lengths):
        return None
    return starts, ends


def _zeroed_region(view: memoryview, pos: int, end: int, starts: np.ndarray) -> np.ndarray:
    """The array's bytes with every 8-byte length field set to zero (ASCII NULs)."""
    region = np.frombuffer(view, dtype=np.uint8, count=end - pos, offset=pos).copy()
    fields = starts - (pos + 8)
    for byte in range(8):  # eight passes: no count x 8 index array
        region[fields + byte] = 0
    return region


def _valid_utf8(view: memoryview, pos: int, end: int, starts: np.ndarray) -> bool:
    """Whether every element is valid UTF-8, with one decode: the elements joined by ASCII NULs decode
    exactly when each one does (a multi-byte sequence never spans an ASCII byte)."""
    try:
        str(memoryview(_zeroed_region(view, pos, end, starts)), "utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _decode_all(view: memoryview, starts: np.ndarray, ends: np.ndarray) -> list[str]:
    """Every element, from one decode of the array (validated by `parse`): split at the zeroed length
    fields when no element holds a NUL, else sliced at each element's character offset."""
    if not len(starts):
        return []
    pos, end = int(starts[0]) - 8, int(ends[-1])
    region = _zeroed_region(view, pos, end, starts)
    text = str(memoryview(region), "utf-8")
    if text.count("\0") == 8 * len(starts):  # the NULs are the length fields'
        return text.split("\0" * 8)[1:]
    if len(text) == len(region):  # ASCII: characters are bytes
        first, last = (starts - pos).tolist(), (ends - pos).tolist()
    else:  # the character index of each byte: the count of the bytes before it that start a character
        chars = np.zeros(len(region) + 1, dtype=np.int32 if len(region) < 1 << 31 else np.int64)
        np.cumsum((region & 0xC0) != 0x80, out=chars[1:])
        first, last = chars[starts - pos].tolist(), chars[ends - pos].tolist()
    return [text[a:b] for a, b in zip(first, last)]
