"""What every engine of the bench shares: sizes, rows, prompts, timing and the machine's state."""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUICK = {"concurrency": 4, "new_tokens": 16, "prompt_tokens": 64, "repeats": 1, "long_context": 512, "shared_prefix": 64}
FULL = {"concurrency": 32, "new_tokens": 128, "prompt_tokens": 500, "repeats": 2, "long_context": 4096,
        "shared_prefix": 400}
TEXT = (
    "The river runs through the old town, past the market square, the stone bridge and the mill. "
    "In spring the water rises and the fishermen mend their nets on the bank while children watch "
    "the boats. Merchants from the coast bring salt, cloth and news of distant cities. "
)
TOPICS = ("the sea", "a mountain village", "the first computer", "a lost cat", "autumn rain",
          "a space station", "an old library", "the desert at night")
TASKS = ("Write a short story about", "Explain to a child", "List three facts about", "Describe")
CHAT_FIRST = "Write a short story about a lighthouse keeper."
CHAT_SECOND = "Now tell the same story from the point of view of the lighthouse."

# the columns, in order: key -> (header, how it is printed, True when higher is better)
COLUMNS: dict[str, tuple[str, str, bool]] = {
    "load_s": ("load (s)", "{:.2f}", False),
    "decode_1_tok_s": ("decode tok/s, 1 stream", "{:.1f}", True),
    "decode_batch_tok_s": ("decode tok/s, {concurrency} concurrent x {new_tokens}", "{:.1f}", True),
    "prefill_tok_s": ("prefill tok/s, {prompt_tokens}-token prompt", "{:.1f}", True),
    "decode_long_tok_s": ("decode tok/s at {long_context} context", "{:.1f}", True),
    "turn2_ttft_ms": ("chat turn 2, first token (ms)", "{:.0f}", False),
    "prefix_turn1_ms": ("{shared_prefix}-token document, question 1: first token (ms)", "{:.0f}", False),
    "prefix_turn2_ms": ("same document, question 2 (prefix cache): first token (ms)", "{:.0f}", False),
    "prefix_ratio": ("question 2 / question 1 first token", "{:.2f}", False),
}


@dataclass
class Settings:
    concurrency: int
    new_tokens: int
    prompt_tokens: int
    repeats: int
    long_context: int
    shared_prefix: int = 400

    @property
    def prefill_repeats(self) -> int:
        return max(3, self.repeats)  # prefill rounds are short: a few more cost little

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        base = QUICK if args.quick else FULL
        values = {k: getattr(args, k, None) if getattr(args, k, None) is not None else v for k, v in base.items()}
        for name, value in values.items():
            least = 2 if name == "new_tokens" else 1
            if value < least:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
        return cls(**values)

    def header(self, key: str) -> str:
        return COLUMNS[key][0].format(**vars(self))


@dataclass
class Row:
    name: str
    values: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def keep(self, key: str, value: float | None) -> None:
        """Keep the best of the rounds: the highest rate, the lowest time."""
        if value is None:
            return
        old = self.values.get(key)
        higher = COLUMNS[key][2]
        if old is None or (value > old if higher else value < old):
            self.values[key] = value


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def batch_prompts(count: int) -> list[str]:
    """`count` short prompts that differ from one another (and in length)."""
    combos = [f"{task} {topic}." for topic in TOPICS for task in TASKS]
    return [combos[i % len(combos)] + (f" (variant {i // len(combos)})" if i >= len(combos) else "")
            for i in range(count)]


def long_prompt_ids(encode: Callable[[str], list[int]], num_tokens: int, salt: int = 0) -> list[int]:
    """About `num_tokens` tokens of prose (exactly that many ids); `salt` makes it start differently,
    so that no prefix cache can serve it from an earlier round."""
    text = f"Note {salt}. " + TEXT
    ids = encode(text)
    while len(ids) < num_tokens:
        text += TEXT
        ids = encode(text)
    return ids[:num_tokens]


def long_prompt_text(num_words_hint: int, salt: int = 0) -> str:
    """Prose for engines that tokenize on their own side: about 1.3 tokens per word here."""
    text = f"Note {salt}. "
    while len(text.split()) * 1.3 < num_words_hint:
        text += TEXT
    return text


def decode_rate(stamps: list[float], expected: int, what: str) -> float:
    """Tokens after the first, over the time from the first token to the last (prefill excluded)."""
    expect(len(stamps), expected, what)
    return (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)


def expect(got: int, want: int, what: str) -> None:
    if got != want:
        raise RuntimeError(f"{what} generated {got} tokens, expected {want}")


def load_average() -> float | None:
    """The 1-minute load average: on a shared machine it says how much the numbers can be trusted."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def peak_rss_mib() -> float:
    """This process's peak resident set so far (KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024


def cpu_name() -> str:
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                return text.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
