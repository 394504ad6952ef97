"""`tokenloom bench`: what users get from tokenloom (its default mode and the exact fp32 mode) next to
transformers (fp32, bf16), llama.cpp on the same GGUF and OpenVINO GenAI on the same weights (L6).

Every number comes from one run, the engines taking turns phase by phase, so ratios are meaningful
even on a noisy machine. transformers is imported lazily and the peers are found under `--peers DIR`
(`make bench-peers` builds them); whatever is missing is skipped with a line saying so.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
from pathlib import Path
from typing import Any

from tokenloom.bench.common import (
    COLUMNS,
    Row,
    Settings,
    batch_prompts,
    cpu_name,
    expect,
    load_average,
    long_prompt_ids,
    peak_rss_mib,
    progress,
    timed,
)
from tokenloom.bench.report import footer, format_ratios, format_table, ratios
from tokenloom.config import DEFAULT_MODEL

__all__ = ["add_arguments", "format_table", "run"]

DEFAULT_ROW = "tokenloom (default)"
EXACT_ROW = "tokenloom (fp32 exact)"
COMPILED_ROW = "tokenloom (fp32 exact, compiled)"  # the CPU compile does not take quantized weights
_HF_ROWS = (("transformers fp32", "float32"), ("transformers bf16", "bfloat16"))


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
    parser.add_argument("--long-context", type=int, default=None,
                        help="context of the long-context decode column (default 4096; 512 with --quick)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds of the decode phases; each column keeps the best (default 2; 1 with --quick)")
    parser.add_argument("--no-transformers", action="store_true", help="leave out the transformers rows")
    parser.add_argument("--peers", default=None, metavar="DIR",
                        help="where `make bench-peers` built llama.cpp and the OpenVINO virtualenv")
    parser.add_argument("--compile", action="store_true",
                        help="add a row for tokenloom's compiled decode (EngineConfig(compile=True); "
                             "compiling takes a while)")
    parser.add_argument("--structured", action="store_true",
                        help="also measure --concurrency JSON-schema requests against as many unconstrained ones "
                             "(what the grammar mask costs)")
    parser.add_argument("--speculative", action="store_true",
                        help="also measure one stream on an edit task with and without prompt lookup (the speed-up, "
                             "the acceptance rate and the mean accepted length)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the numbers to PATH")


def _import_transformers() -> Any | None:
    try:
        import transformers
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def _measure(runners: list[Any], peers: list[Any], s: Settings, encode: Any) -> list[Row]:
    """Phase by phase, the engines take turns within each round, so a burst of load on a shared
    machine hits all of them alike; every column keeps an engine's best round."""
    rows = {r.name: Row(r.name, {"load_s": r.load_s}) for r in [*runners, *peers] if hasattr(r, "load_s")}
    for p in peers:
        rows.setdefault(p.name, Row(p.name))
    prompt, prompts, n = batch_prompts(1)[0], batch_prompts(s.concurrency), s.new_tokens
    for r in runners:
        progress(f"{r.name}: warm-up")
        r.batch(["Hello there"], 4)
    for round_ in range(1, s.repeats + 1):
        of = f"round {round_}/{s.repeats}"
        for r in runners:
            progress(f"{r.name}: decode, 1 stream x {n} tokens ({of})")
            rows[r.name].keep("decode_1_tok_s", r.decode(prompt, n))
        for r in runners:
            progress(f"{r.name}: decode, {s.concurrency} concurrent x {n} tokens ({of})")
            total, wall = timed(lambda r=r: r.batch(prompts, n))
            expect(total, s.concurrency * n, f"{r.name} batch")
            rows[r.name].keep("decode_batch_tok_s", total / wall)
        long_ids = long_prompt_ids(encode, s.long_context, salt=round_)
        for r in runners:
            progress(f"{r.name}: decode at {s.long_context} context ({of})")
            rows[r.name].keep("decode_long_tok_s", r.long_decode(long_ids, n))
        for r in runners:
            progress(f"{r.name}: chat, second turn ({of})")
            rows[r.name].keep("turn2_ttft_ms", 1000 * r.turn2_ttft())
        document = long_prompt_ids(encode, s.shared_prefix, salt=200 + round_)  # cold every round
        for r in runners:
            if hasattr(r, "prefix_turns"):
                progress(f"{r.name}: two questions on a {s.shared_prefix}-token document ({of})")
                first, second, cached = r.prefix_turns(document, n)
                rows[r.name].keep("prefix_turn1_ms", 1000 * first)
                rows[r.name].keep("prefix_turn2_ms", 1000 * second)
                rows[r.name].keep("prefix_ratio", second / first)
                rows[r.name].keep("prefix_hit_rate", cached)
        for p in peers:
            progress(f"{p.name}: {of}")
            _measure_peer(p, rows[p.name], s, prompts, round_)
    for round_ in range(1, s.prefill_repeats + 1):
        ids = long_prompt_ids(encode, s.prompt_tokens, salt=100 + round_)  # a new prompt every round
        for r in runners:
            progress(f"{r.name}: prefill, {s.prompt_tokens}-token prompt (round {round_}/{s.prefill_repeats})")
            rows[r.name].keep("prefill_tok_s", s.prompt_tokens / r.prefill(ids))
    return list(rows.values())


def _measure_peer(peer: Any, row: Row, s: Settings, prompts: list[str], round_: int) -> None:
    from tokenloom.bench.peers import LlamaBench, LlamaServer, OpenVinoGenAI

    if isinstance(peer, LlamaBench):
        for key, value in peer.measure(s).items():
            row.keep(key, value)
    elif isinstance(peer, LlamaServer):
        total, wall = timed(lambda: peer.batch(prompts, s.new_tokens))
        expect(total, s.concurrency * s.new_tokens, f"{peer.name} batch")
        row.keep("decode_batch_tok_s", total / wall)
        row.keep("turn2_ttft_ms", 1000 * peer.turn2_ttft(s.new_tokens))
        rss = peer.peak_rss_mib()
        row.note = f"peak RSS {rss:.0f} MiB" if rss else ""
    elif isinstance(peer, OpenVinoGenAI):
        values = peer.measure(s, round_)
        for key in COLUMNS:
            if key in values and key != "load_s":
                row.keep(key, float(values[key]))
        row.note = f"peak RSS {values.get('peak_rss_mib', 0):.0f} MiB"


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
        "cpu": cpu_name(),
        "python": platform.python_version(),
        "load_average_start": load_average(),
    }


def _tokenloom_runners(args: argparse.Namespace, s: Settings) -> list[Any]:
    from tokenloom.bench.engines import TokenloomRunner

    # dtype None: whatever LLM(...) picks by default, so the row follows the default as it changes
    runners = [TokenloomRunner(args, s, DEFAULT_ROW, None), TokenloomRunner(args, s, EXACT_ROW, "float32")]
    if args.compile:
        runners.append(TokenloomRunner(args, s, COMPILED_ROW, "float32", compile=True))
    return runners


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the tables on stdout; progress goes to stderr."""
    settings = Settings.from_args(args)
    env = _environment(args.threads)
    progress(f"torch {env['torch']}, torch threads: {env['torch_threads']}, cpu: {env['cpu']}")
    progress(f"sizes: {settings.concurrency} concurrent x {settings.new_tokens} new tokens, "
             f"{settings.prompt_tokens}-token prefill prompt, {settings.long_context}-token long context")
    runners = _tokenloom_runners(args, settings)
    ours = runners[0]
    llm = ours.llm
    env["device"] = str(llm.loaded.device)
    env["tokenloom_memory"] = llm.memory_usage().describe()
    env["peak_rss_mib_after_tokenloom"] = round(peak_rss_mib(), 1)
    progress(f"device: {env['device']}; {env['tokenloom_memory']}")

    notes: list[str] = []
    transformers = None if args.no_transformers else _import_transformers()
    if args.no_transformers:
        notes.append("transformers rows skipped (--no-transformers)")
    elif transformers is None:
        notes.append("transformers is not installed: skipping the transformers rows (pip install 'tokenloom[test]')")
    else:
        from tokenloom.bench.engines import TransformersRunner

        env["transformers"] = transformers.__version__
        source = llm.loaded.checkpoint.source
        for name, dtype_name in _HF_ROWS:
            runners.append(TransformersRunner(transformers, source, llm.loaded.device, name, dtype_name, settings))

    peers: list[Any] = []
    if args.peers is None:
        notes.append("peers skipped (no --peers DIR; `make bench-peers` builds llama.cpp and OpenVINO GenAI)")
    else:
        from tokenloom.bench.peers import start_peers

        source = llm.loaded.checkpoint.source
        gguf = source.path if source.kind == "gguf" else None
        peers, peer_notes = start_peers(Path(args.peers), gguf, env["torch_threads"], settings)
        notes.extend(peer_notes)
    try:
        rows = _measure(runners, peers, settings, llm.tokenizer.encode)
    finally:
        for p in peers:
            if hasattr(p, "close"):
                p.close()
    structured = None
    if getattr(args, "structured", False):
        from tokenloom.bench.structured import measure_structured

        progress("structured output: JSON-schema requests vs unconstrained ones")
        structured = measure_structured(llm, settings.concurrency, settings.new_tokens, settings.repeats)
    speculative = None
    if getattr(args, "speculative", False):
        from tokenloom.bench.speculative import measure_speculative

        progress("speculative decoding: one stream on an edit task, with and without prompt lookup")
        speculative = measure_speculative(llm, settings.new_tokens, 5, settings.repeats)
    env["load_average_end"] = load_average()
    env["peak_rss_mib_end"] = round(peak_rss_mib(), 1)
    progress("done")

    versions = f"torch {env['torch']}" + (f", transformers {env['transformers']}" if "transformers" in env else "")
    print(f"model: {args.model}  device: {env['device']}  cpu: {env['cpu']}  "
          f"torch threads: {env['torch_threads']}  {versions}")
    if env["load_average_start"] is not None:
        print(f"1-minute load average: {env['load_average_start']} at start, {env['load_average_end']} at end "
              f"(a value above the core count means other processes competed for the CPU)")
    print(f"tokenloom (default): {env['tokenloom_memory']}; this process's peak RSS "
          f"{env['peak_rss_mib_after_tokenloom']:.0f} MiB after loading tokenloom, {env['peak_rss_mib_end']:.0f} MiB "
          "at the end (every in-process engine loaded)")
    for r in rows:
        if r.note:
            print(f"{r.name}: {r.note}")
    print()
    print(format_table(rows, settings))
    others = [r for r in rows if r.name != DEFAULT_ROW]
    ratio_table = format_ratios(rows[0], others, settings)
    if ratio_table:
        print()
        print(ratio_table)
    print()
    print(footer(settings))
    for note in notes:
        print(note)
    if structured is not None:
        print(structured.describe())
    if speculative is not None:
        from tokenloom.bench.speculative import describe

        print(describe(speculative))
    if args.json:
        payload = {**env, "model": args.model, "settings": vars(settings),
                   "results": {r.name: r.values for r in rows},
                   "ratios_of_default": ratios(rows[0], others), "notes": notes}
        if structured is not None:
            payload["structured"] = {"json_tok_s": structured.json_tok_s, "free_tok_s": structured.free_tok_s,
                                     "mask_cost": structured.mask_cost}
        if speculative is not None:
            payload["speculative"] = speculative
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        progress(f"wrote {args.json}")
    return 0
