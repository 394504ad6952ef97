"""`tokenloom bench`: load time, decode and prefill speed of tokenloom next to transformers (L6).

Every number comes from one process, measured side by side, so ratios are meaningful even on a
noisy machine. transformers is only an optional oracle: it is imported lazily, and its rows are
skipped (with a line saying so) when it is missing or --no-transformers is given.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenloom.config import DEFAULT_MODEL

_QUICK = {"concurrency": 4, "new_tokens": 16, "prompt_tokens": 64, "repeats": 1}
_FULL = {"concurrency": 32, "new_tokens": 128, "prompt_tokens": 500, "repeats": 2}
_TEXT = (
    "The river runs through the old town, past the market square, the stone bridge and the mill. "
    "In spring the water rises and the fishermen mend their nets on the bank while children watch "
    "the boats. Merchants from the coast bring salt, cloth and news of distant cities. "
)
_TOPICS = ("the sea", "a mountain village", "the first computer", "a lost cat", "autumn rain",
           "a space station", "an old library", "the desert at night")
_TASKS = ("Write a short story about", "Explain to a child", "List three facts about", "Describe")
_TOKENLOOM = "tokenloom (fp32)"
_HF_ROWS = (("transformers fp32", "float32"), ("transformers bf16", "bfloat16"))
_KEYS = ("load_s", "decode_1_tok_s", "decode_batch_tok_s", "prefill_tok_s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the bench options (cheap: no torch import here)."""
    parser.add_argument("--model", "-m", default=DEFAULT_MODEL,
                        help=f"path, pull name or hub id (default: {DEFAULT_MODEL})")
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside --model's directory")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="requests decoded together (default 32; 4 with --quick)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="tokens generated per request (default 128; 16 with --quick)")
    parser.add_argument("--prompt-tokens", type=int, default=None,
                        help="prompt length for the prefill column (default 500; 64 with --quick)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds of the decode phases; each column keeps the best (default 2; 1 with --quick)")
    parser.add_argument("--no-transformers", action="store_true", help="measure tokenloom only")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the numbers to PATH")


@dataclass
class Settings:
    concurrency: int
    new_tokens: int
    prompt_tokens: int
    repeats: int

    @property
    def prefill_repeats(self) -> int:
        return max(3, self.repeats)  # prefill rounds are short: a few more cost little

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        base = _QUICK if args.quick else _FULL
        values = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
        for name, value in values.items():
            if value < 1 or (name == "new_tokens" and value < 2):
                raise ValueError(f"--{name.replace('_', '-')} must be >= {2 if name == 'new_tokens' else 1}, "
                                 f"got {value}")
        return cls(**values)


@dataclass
class Row:
    name: str
    values: dict[str, float] = field(default_factory=dict)


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _batch_prompts(count: int) -> list[str]:
    """`count` short prompts that differ from one another (and in length)."""
    combos = [f"{task} {topic}." for topic in _TOPICS for task in _TASKS]
    return [combos[i % len(combos)] + (f" (variant {i // len(combos)})" if i >= len(combos) else "")
            for i in range(count)]


def _long_prompt_ids(encode: Callable[[str], list[int]], num_tokens: int) -> list[int]:
    text = _TEXT
    ids = encode(text)
    while len(ids) < num_tokens:
        text += _TEXT
        ids = encode(text)
    return ids[:num_tokens]


# ---- engines -------------------------------------------------------------------------------
class _TokenloomRunner:
    """tokenloom's offline LLM: one engine; concurrent prompts go in as one continuous batch."""

    def __init__(self, args: argparse.Namespace, s: Settings) -> None:
        from tokenloom.config import EngineConfig
        from tokenloom.llm import LLM

        self.name = _TOKENLOOM
        _progress(f"{self.name}: loading {args.model}")
        config = EngineConfig(max_num_seqs=max(64, s.concurrency))
        self.llm, self.load_s = _timed(lambda: LLM(args.model, gguf_file=args.gguf_file, dtype="float32",
                                                   engine_config=config))

    def _params(self, n: int) -> Any:
        return self.llm.sampling_params(temperature=0.0, max_tokens=n, ignore_eos=True)

    def decode_stamps(self, prompt: str, n: int) -> list[float]:
        return [time.perf_counter() for out in self.llm.stream(prompt, self._params(n))
                for _ in out.new_token_ids]

    def batch(self, prompts: list[str], n: int) -> int:
        return sum(len(c.token_ids) for c in self.llm.generate(prompts, self._params(n)))

    def first_token(self, ids: list[int]) -> None:
        for _ in self.llm.stream(ids, self._params(1)):
            pass


class _StampStreamer:
    """A transformers streamer that only records when each put() happens: the first put is the
    prompt (before prefill), every later one a new token."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: Any) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


class _TransformersRunner:
    """transformers' own model from the same checkpoint; a batch is one left-padded generate call."""

    def __init__(self, transformers: Any, source: Any, device: Any, name: str, dtype_name: str) -> None:
        import torch

        self.name, self.device, self.torch = name, device, torch
        where = str(source.path.parent if source.kind == "gguf" else source.path)
        extra = {"gguf_file": source.path.name} if source.kind == "gguf" else {}

        def load() -> tuple[Any, Any]:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                where, dtype=getattr(torch, dtype_name), **extra
            ).to(device).eval()
            return model, transformers.AutoTokenizer.from_pretrained(where, padding_side="left", **extra)

        _progress(f"{name}: loading")
        (self.model, self.tokenizer), self.load_s = _timed(load)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _generate(self, inputs: dict[str, Any], n: int, **kw: Any) -> Any:
        with self.torch.inference_mode():
            return self.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                       pad_token_id=self.tokenizer.pad_token_id, **kw)

    def _encode(self, prompts: list[str]) -> dict[str, Any]:
        return dict(self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device))

    def decode_stamps(self, prompt: str, n: int) -> list[float]:
        streamer = _StampStreamer()
        self._generate(self._encode([prompt]), n, streamer=streamer)
        return streamer.stamps[1:]

    def batch(self, prompts: list[str], n: int) -> int:
        inputs = self._encode(prompts)
        out = self._generate(inputs, n)
        return (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]

    def first_token(self, ids: list[int]) -> None:
        tensor = self.torch.tensor([ids], device=self.device)
        self._generate({"input_ids": tensor, "attention_mask": self.torch.ones_like(tensor)}, 1)


def _measure(runners: list[Any], s: Settings, long_ids: list[int]) -> list[Row]:
    """Phase by phase, the engines take turns within each round, so a burst of load on a shared
    machine hits all of them alike; every column keeps an engine's best round."""
    rows = {r.name: Row(r.name, {"load_s": r.load_s}) for r in runners}
    prompt, prompts, n = _batch_prompts(1)[0], _batch_prompts(s.concurrency), s.new_tokens

    def keep_best(runner: Any, key: str, value: float) -> None:
        rows[runner.name].values[key] = max(value, rows[runner.name].values.get(key, 0.0))

    for r in runners:
        _progress(f"{r.name}: warm-up")
        r.batch(["Hello there"], 4)
    for round_ in range(1, s.repeats + 1):
        of = f"round {round_}/{s.repeats}"
        for r in runners:
            _progress(f"{r.name}: decode, 1 stream x {n} tokens ({of})")
            keep_best(r, "decode_1_tok_s", _decode_rate(r.decode_stamps(prompt, n), n))
        for r in runners:
            _progress(f"{r.name}: decode, {s.concurrency} concurrent x {n} tokens ({of})")
            total, wall = _timed(lambda r=r: r.batch(prompts, n))
            _expect(total, s.concurrency * n, f"{r.name} batch")
            keep_best(r, "decode_batch_tok_s", total / wall)
    for round_ in range(1, s.prefill_repeats + 1):
        for r in runners:
            _progress(f"{r.name}: prefill, {s.prompt_tokens}-token prompt (round {round_}/{s.prefill_repeats})")
            keep_best(r, "prefill_tok_s", s.prompt_tokens / _timed(lambda r=r: r.first_token(long_ids))[1])
    return list(rows.values())


def _decode_rate(stamps: list[float], expected: int) -> float:
    """Tokens after the first, over the time from the first token to the last (prefill excluded)."""
    _expect(len(stamps), expected, "single-stream decode")
    return (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)


def _expect(got: int, want: int, what: str) -> None:
    if got != want:
        raise RuntimeError(f"{what} generated {got} tokens, expected {want}")


def _import_transformers() -> Any | None:
    try:
        import transformers
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


# ---- report ---------------------------------------------------------------------------------
def _headers(s: Settings) -> list[str]:
    return ["engine", "load (s)", "decode tok/s, 1 stream",
            f"decode tok/s, {s.concurrency} concurrent x {s.new_tokens}",
            f"prefill tok/s, {s.prompt_tokens}-token prompt"]


def _ratios(rows: list[Row]) -> dict[str, float] | None:
    by_name = {r.name: r.values for r in rows}
    ours, base = by_name.get(_TOKENLOOM), by_name.get(_HF_ROWS[0][0])
    if ours is None or base is None:
        return None
    return {k: ours[k] / base[k] for k in _KEYS if base.get(k)}


def format_table(rows: list[Row], s: Settings) -> str:
    """A markdown table: one row per engine, then the tokenloom / transformers-fp32 ratios."""
    headers = _headers(s)
    body = [[r.name, f"{r.values['load_s']:.2f}"] + [f"{r.values[k]:.1f}" for k in _KEYS[1:]] for r in rows]
    ratios = _ratios(rows)
    if ratios:
        body.append(["tokenloom / transformers fp32"] + [f"{ratios[k]:.2f}x" for k in _KEYS])
    widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" if i else ":" + "-" * (w + 1) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), sep, *(line(b) for b in body)])


def _footer(s: Settings, has_ratios: bool) -> str:
    lines = [
        "load: model + tokenizer construction (tokenloom: LLM(...), including its KV cache; "
        "transformers: from_pretrained of model and tokenizer).",
        f"decode, 1 stream: one greedy request, {s.new_tokens} new tokens; prefill excluded "
        f"(the {s.new_tokens - 1} tokens after the first, timed from the first token to the last).",
        f"decode, concurrent: {s.concurrency} different short prompts x {s.new_tokens} new tokens, "
        "total generated tokens / wall time (prefill of the short prompts included); tokenloom: one "
        "continuous batch in one engine, transformers: generate on a left-padded batch.",
        f"prefill: prompt tokens / time to first token on a {s.prompt_tokens}-token prompt "
        f"(best of {s.prefill_repeats}).",
        f"All engines were loaded first and took turns within each phase; decode columns are the best of "
        f"{s.repeats} round(s). Every engine ran one short warm-up generation first; EOS is ignored so each "
        "request generates exactly the requested number of tokens.",
    ]
    if has_ratios:
        lines.append("Ratios: load < 1 means tokenloom loads faster; tok/s > 1 means tokenloom is faster.")
    return "\n".join(lines)


def _environment(threads: int | None) -> dict[str, Any]:
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "python": platform.python_version(),
        "load_average_start": _load_average(),
    }


def _load_average() -> float | None:
    """The 1-minute load average: on a shared machine it says how much the numbers can be trusted."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _cpu_name() -> str:
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                return text.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table on stdout; progress goes to stderr."""
    settings = Settings.from_args(args)
    env = _environment(args.threads)
    _progress(f"torch {env['torch']}, torch threads: {env['torch_threads']}, cpu: {env['cpu']}")
    _progress(f"sizes: {settings.concurrency} concurrent x {settings.new_tokens} new tokens, "
              f"{settings.prompt_tokens}-token prefill prompt")
    ours = _TokenloomRunner(args, settings)
    llm = ours.llm
    env["device"] = str(llm.loaded.device)
    _progress(f"device: {env['device']}")
    runners: list[Any] = [ours]

    skipped = None
    transformers = None if args.no_transformers else _import_transformers()
    if args.no_transformers:
        skipped = "transformers rows skipped (--no-transformers)"
    elif transformers is None:
        skipped = "transformers is not installed: skipping the transformers rows (pip install 'tokenloom[test]')"
    else:
        env["transformers"] = transformers.__version__
        for name, dtype_name in _HF_ROWS:
            runners.append(_TransformersRunner(transformers, llm.loaded.checkpoint.source, llm.loaded.device,
                                               name, dtype_name))
    rows = _measure(runners, settings, _long_prompt_ids(llm.tokenizer.encode, settings.prompt_tokens))
    env["load_average_end"] = _load_average()
    _progress("done")

    ratios = _ratios(rows)
    versions = f"torch {env['torch']}" + (f", transformers {env['transformers']}" if "transformers" in env else "")
    print(f"model: {args.model}  device: {env['device']}  cpu: {env['cpu']}  "
          f"torch threads: {env['torch_threads']}  {versions}")
    if env["load_average_start"] is not None:
        print(f"1-minute load average: {env['load_average_start']} at start, {env['load_average_end']} at end "
              f"(a value above the core count means other processes competed for the CPU)")
    print()
    print(format_table(rows, settings))
    print()
    print(_footer(settings, ratios is not None))
    if skipped:
        print(skipped)
    if args.json:
        payload = {**env, "model": args.model, "settings": vars(settings),
                   "results": {r.name: r.values for r in rows}, "ratios_vs_transformers_fp32": ratios}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        _progress(f"wrote {args.json}")
    return 0
