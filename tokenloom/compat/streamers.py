"""transformers-style streamers (L6): TextStreamer, TextIteratorStreamer, AsyncTextIteratorStreamer.

They keep transformers' interface and flushing policy (text is released at word boundaries, after a
newline, or right after a CJK character) but decode with tokenloom's incremental detokenizer: each
token is decoded once (transformers re-decodes the whole line every step) and a character split
across tokens is never released in pieces.

Protocol (what `generate(streamer=...)` calls): `put(input_ids)` once with the prompt
([batch, width]; dropped with skip_prompt), then for one row `put(new_ids)` per step, for a batch
`put_row(row, new_ids)`, and `end()` once at the end. transformers' streamers refuse batches; these
stream them: the iterator streamers yield `(row, text)` tuples and TextStreamer prints each row's
completed lines prefixed with `[row] `.

A consumer that stops reading stops the generation: `stop()`, closing an iterator streamer
(`close()` / `aclose()`), or a `timeout` that expires (the consumer waited that long for text, or text
waited that long for the consumer) makes `stop_requested` true; generate() then stops after the
current step and its requests leave the engine.
"""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from collections.abc import Sequence
from queue import Empty, Queue
from typing import Any

from tokenloom.detokenizer import Decoder, IncrementalDetokenizer

# transformers' _is_chinese_char ranges: text ending in one of these is released at once (CJK text
# has no spaces to wait for).
_CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in _CJK_RANGES)


class _DecodeWithKwargs:
    """Forwards extra decode keyword arguments (e.g. clean_up_tokenization_spaces) to a tokenizer."""

    def __init__(self, tokenizer: Any, kwargs: dict[str, Any]) -> None:
        self.tokenizer = tokenizer
        self.kwargs = kwargs

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **self.kwargs)


def _decoder_for(tokenizer: Any, decode_kwargs: dict[str, Any]) -> tuple[Decoder, bool]:
    kwargs = dict(decode_kwargs)
    skip_special_tokens = bool(kwargs.pop("skip_special_tokens", False))
    if kwargs:
        return _DecodeWithKwargs(tokenizer, kwargs), skip_special_tokens
    # tokenloom's AutoTokenizer wraps the engine tokenizer: decode with it directly (plain lists).
    return getattr(tokenizer, "engine_tokenizer", tokenizer), skip_special_tokens


def stop_requested(streamer: Any) -> bool:
    """Whether generate() should stop for this streamer (False for streamers without the notion)."""
    return bool(getattr(streamer, "stop_requested", False))


def _as_ids(value: Any) -> list[int] | list[list[int]]:
    """A tensor, array, list or single id as a list of ids (1-D) or of rows (2-D)."""
    value = value.tolist() if hasattr(value, "tolist") else value
    if isinstance(value, int):
        return [value]
    return [[int(i) for i in row] for row in value] if value and isinstance(value[0], list) else [int(i) for i in value]


class _RowText:
    """One row: its incremental detokenizer and the decoded text not yet released."""

    def __init__(self, decoder: Decoder, skip_special_tokens: bool) -> None:
        self.detokenizer = IncrementalDetokenizer(decoder, None, skip_special_tokens=skip_special_tokens)
        self.pending = ""

    def push(self, ids: Sequence[int]) -> str:
        """Add tokens; return the text ready to show (transformers' policy, on whole characters)."""
        self.pending += self.detokenizer.push_many(ids)
        text = self.pending
        if not text:
            return ""
        cut = len(text) if text.endswith("\n") or _is_cjk(text[-1]) else text.rfind(" ") + 1
        self.pending = text[cut:]
        return text[:cut]

    def finish(self) -> str:
        text = self.pending + self.detokenizer.flush()
        self.pending = ""
        return text


class TextStreamer:
    """Prints the text to stdout as it is generated, like transformers' TextStreamer.

    skip_prompt: do not print the prompt (the first `put`). decode_kwargs go to the tokenizer's
    decode (e.g. skip_special_tokens=True). For a batch, each row's completed lines are printed
    prefixed with `[row] `. Subclasses may override `on_finalized_text` (one row) and
    `on_finalized_row_text` (a batch)."""

    timeout: float | None = None

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, **decode_kwargs: Any) -> None:
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self._decoder, self._skip_special_tokens = _decoder_for(tokenizer, decode_kwargs)
        self._rows: list[_RowText] | None = None  # None until the prompt arrives
        self._line_buffers: dict[int, str] = {}
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._unread = 0  # pieces handed to the consumer and not yet taken
        self._unread_since: float | None = None  # when the oldest of them was handed over

    # ---- stopping -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask generate() to stop: it finishes the current step and its requests leave the engine."""
        self._stopped.set()

    @property
    def stop_requested(self) -> bool:
        """True after stop() / close(), or when text has waited longer than `timeout` for the consumer."""
        if not self._stopped.is_set() and self.timeout is not None:
            with self._lock:
                since = self._unread_since
            if since is not None and time.monotonic() - since > self.timeout:
                self._stopped.set()
                warnings.warn(  # not silent: a consumer that only reads after generate() returns lands here
                    f"generation stopped: streamed text waited unread for more than timeout={self.timeout} s "
                    "(read the streamer from another thread while generate() runs, or pass timeout=None)",
                    RuntimeWarning, stacklevel=2,
                )
        return self._stopped.is_set()

    def _handed_over(self) -> None:
        with self._lock:
            if self._unread == 0:
                self._unread_since = time.monotonic()
            self._unread += 1

    def _taken(self) -> None:
        with self._lock:
            self._unread = max(self._unread - 1, 0)
            self._unread_since = time.monotonic() if self._unread else None

    @property
    def is_batch(self) -> bool:
        """True when the prompt had more than one row (text then comes per row)."""
        return self._rows is not None and len(self._rows) > 1

    def _new_row(self) -> _RowText:
        return _RowText(self._decoder, self._skip_special_tokens)

    def put(self, value: Any) -> None:
        """The prompt ([batch, width] or [width]) on the first call, then one row's new token ids."""
        ids = _as_ids(value)
        if self._rows is None:
            rows: list[list[int]] = ids if ids and isinstance(ids[0], list) else [ids]  # type: ignore[assignment]
            self._rows = [self._new_row() for _ in rows] or [self._new_row()]
            if not self.skip_prompt:
                for row, prompt in enumerate(rows):
                    self._emit(row, self._rows[row].push(prompt))
            return
        if self.is_batch:
            raise ValueError(
                f"this streamer is streaming a batch of {len(self._rows)} rows: send new tokens with "
                "put_row(row, new_ids)"
            )
        if ids and isinstance(ids[0], list):
            if len(ids) != 1:
                raise ValueError(f"put() takes the new tokens of one row, got {len(ids)} rows")
            ids = ids[0]
        self._emit(0, self._rows[0].push(ids))  # type: ignore[arg-type]

    def put_row(self, row: int, new_ids: Sequence[int]) -> None:
        """New token ids of one row of a batch."""
        if self._rows is None:
            raise ValueError("put_row() before the prompt: call put(input_ids) first")
        if not 0 <= row < len(self._rows):
            raise ValueError(
                f"row must be in [0, {len(self._rows)}), got {row}: the prompt given to put() needs one row "
                "per output row (with num_return_sequences, each prompt row repeated that many times)"
            )
        self._emit(row, self._rows[row].push(_as_ids(new_ids)))  # type: ignore[arg-type]

    def end(self) -> None:
        """Release what is left of every row and signal the end of the stream."""
        rows, batched = self._rows or [self._new_row()], self.is_batch
        self._rows = None  # ready for the next generate()
        for row, state in enumerate(rows):
            last = row == len(rows) - 1
            if batched:
                self.on_finalized_row_text(row, state.finish(), stream_end=last)
            else:
                self.on_finalized_text(state.finish(), stream_end=True)

    def _emit(self, row: int, text: str) -> None:
        if not text:
            return
        if self.is_batch:
            self.on_finalized_row_text(row, text)
        else:
            self.on_finalized_text(text)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        """Text of a one-row stream, ready to show; a newline ends the stream."""
        print(text, flush=True, end=None if stream_end else "")

    def on_finalized_row_text(self, row: int, text: str, stream_end: bool = False) -> None:
        """Text of one row of a batch. Prints the row's completed lines; each row's last line when
        the stream ends (`stream_end` is True on the call for the last row)."""
        buffer = self._line_buffers.get(row, "") + text
        *lines, buffer = buffer.split("\n")
        for line in lines:
            print(f"[{row}] {line}", flush=True)
        self._line_buffers[row] = buffer
        if stream_end:
            for index in sorted(self._line_buffers):
                if self._line_buffers[index]:
                    print(f"[{index}] {self._line_buffers[index]}", flush=True)
            self._line_buffers = {}


class TextIteratorStreamer(TextStreamer):
    """Iterate over the text while `generate` runs in another thread, as in transformers:

        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
        Thread(target=model.generate, kwargs=dict(**inputs, streamer=streamer)).start()
        for text in streamer: ...

    Yields strings for one row, `(row, text)` tuples for a batch. timeout: seconds to wait for the
    next piece before `queue.Empty` is raised (None waits forever); when it expires (or text waits that
    long unread) the generation is stopped too. `close()` (or `stop()`) stops it at once."""

    def __init__(
        self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs: Any
    ) -> None:
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: Queue[Any] = Queue()
        self.stop_signal = None
        self.timeout = timeout
        self._closed = False

    def _put(self, value: Any) -> None:
        if not self._closed:
            self._handed_over()
            self.text_queue.put(value, timeout=self.timeout)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self._put(text)
        if stream_end:
            self._put(self.stop_signal)

    def on_finalized_row_text(self, row: int, text: str, stream_end: bool = False) -> None:
        if text:
            self._put((row, text))
        if stream_end:
            self._put(self.stop_signal)

    def close(self) -> None:
        """Stop reading: the generation stops and the iterator ends."""
        self._closed = True
        self.stop()
        while True:
            try:
                self.text_queue.get_nowait()
            except Empty:
                break

    def __iter__(self) -> TextIteratorStreamer:
        return self

    def __next__(self) -> str | tuple[int, str]:
        if self._closed:
            raise StopIteration
        try:
            value = self.text_queue.get(timeout=self.timeout)
        except Empty:
            self.stop()  # the consumer waited `timeout` for text: it is not worth producing more
            raise
        self._taken()
        if value is self.stop_signal:
            raise StopIteration
        return value


class AsyncTextIteratorStreamer(TextStreamer):
    """`async for text in streamer` while `generate` runs in a thread (e.g. `asyncio.to_thread`).
    Create it inside the running event loop. Yields strings for one row, `(row, text)` tuples for
    a batch. timeout: seconds to wait for the next piece before TimeoutError (None waits forever); when
    it expires (or text waits that long unread) the generation is stopped too, as by `aclose()` or
    `stop()`."""

    def __init__(
        self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs: Any
    ) -> None:
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: asyncio.Queue[Any] = asyncio.Queue()
        self.stop_signal = None
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        self._closed = False

    def _put(self, value: Any) -> None:
        # generate() runs in another thread: hand each piece to the loop that owns the queue.
        if self.loop.is_closed():
            self.stop()
            return
        self._handed_over()
        try:
            self.loop.call_soon_threadsafe(self.text_queue.put_nowait, value)
        except RuntimeError:  # the loop closed meanwhile: nobody will read
            self.stop()

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self._put(text)
        if stream_end:
            self._put(self.stop_signal)

    def on_finalized_row_text(self, row: int, text: str, stream_end: bool = False) -> None:
        if text:
            self._put((row, text))
        if stream_end:
            self._put(self.stop_signal)

    def __aiter__(self) -> AsyncTextIteratorStreamer:
        return self

    async def aclose(self) -> None:
        """Stop reading: the generation stops and the iterator ends."""
        self.stop()
        self._closed = True

    async def __anext__(self) -> str | tuple[int, str]:
        if self._closed:
            raise StopAsyncIteration
        try:
            value = await asyncio.wait_for(self.text_queue.get(), timeout=self.timeout)
        except asyncio.TimeoutError:
            self.stop()
            raise TimeoutError(f"no text from the streamer within {self.timeout} seconds") from None
        self._taken()
        if value is self.stop_signal:
            raise StopAsyncIteration
        return value
