"""`tokenloom bench --quick --no-transformers` end to end through the CLI: the tables, the JSON; the
peers' discovery and llama-bench's output read from a stand-in executable; the ratios."""

from __future__ import annotations

import json
import re
import stat

import pytest
import torch

from tokenloom.bench.common import Row, Settings
from tokenloom.bench.peers import LlamaBench, find_llama_cpp, find_openvino
from tokenloom.bench.report import ratios
from tokenloom.cli import main

QUICK_HEADER = ["load (s)", "decode tok/s, 1 stream", "decode tok/s, 4 concurrent x 16",
                "prefill tok/s, 64-token prompt", "decode tok/s at 512 context", "chat turn 2, first token (ms)",
                "64-token document, question 1: first token (ms)",
                "same document, question 2 (prefix cache): first token (ms)", "question 2 / question 1 first token",
                "question 2 prompt tokens from the cache"]
QUICK = Settings(concurrency=4, new_tokens=16, prompt_tokens=64, repeats=1, long_context=512, shared_prefix=64)


@pytest.fixture(autouse=True)
def _restore_threads():
    """--threads changes torch's global thread count; give the rest of the suite its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _tables(text: str) -> list[list[list[str]]]:
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables + ([current] if current else [])


def test_bench_quick_without_transformers(smollm2_gguf, tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    # one thread: on a small shared machine two OpenMP threads can stall each other for seconds
    code = main(["bench", "--quick", "--no-transformers", "--threads", "1", "--peers", str(tmp_path / "none"),
                 "--structured", "--speculative", "--json", str(out_json)])
    captured = capsys.readouterr()
    assert code == 0, captured.err

    figures, ratio_table = _tables(captured.out)
    assert figures[0] == ["engine", *QUICK_HEADER]
    assert all(re.fullmatch(r":?-+:?", cell) for cell in figures[1])
    body = figures[2:]
    assert [r[0] for r in body] == ["tokenloom (default)", "tokenloom (fp32 exact)"]  # no transformers rows
    assert all(float(cell) > 0 for row in body for cell in row[1:])
    assert ratio_table[0] == ["tokenloom (default) vs", *QUICK_HEADER]
    assert [r[0] for r in ratio_table[2:]] == ["tokenloom (fp32 exact)"]
    assert all(re.fullmatch(r"\d+\.\d\dx", cell) for cell in ratio_table[2][1:])
    for line in ("transformers rows skipped (--no-transformers)", "llama.cpp skipped: no llama-bench under",
                 "OpenVINO GenAI skipped", "prefill excluded", "torch threads: 1", "peak RSS", "load average"):
        assert line in captured.out
    for phrase in ("torch threads: 1", "device: ", "tokenloom (default): decode", "tokenloom (fp32 exact): prefill",
                   "decode at 512 context", "chat, second turn", "two questions on a 64-token document"):
        assert phrase in captured.err

    data = json.loads(out_json.read_text())
    assert data["settings"] == vars(QUICK)
    for name in ("tokenloom (default)", "tokenloom (fp32 exact)"):
        values = data["results"][name]
        assert set(values) == {"load_s", "decode_1_tok_s", "decode_batch_tok_s", "prefill_tok_s",
                               "decode_long_tok_s", "turn2_ttft_ms", "prefix_turn1_ms", "prefix_turn2_ms",
                               "prefix_ratio", "prefix_hit_rate"}
        assert all(v > 0 for v in values.values())
    assert set(data["ratios_of_default"]) == {"tokenloom (fp32 exact)"}
    assert "structured output: 4 concurrent x 16 tokens: JSON schema" in captured.out
    assert data["structured"]["json_tok_s"] > 0 and data["structured"]["free_tok_s"] > 0
    assert "speculative decoding, prompt lookup (k=5) on an edit task" in captured.out
    spec = data["speculative"]
    assert spec["same_tokens"] is True  # greedy with prompt lookup gives the plain tokens
    assert spec["prompt_lookup"]["acceptance_rate"] > 0 and spec["prompt_lookup"]["mean_accepted_length"] > 1


def test_bench_rejects_bad_sizes(capsys):
    assert main(["bench", "--quick", "--no-transformers", "--new-tokens", "1"]) == 1
    assert "--new-tokens must be >= 2" in capsys.readouterr().err


def test_ratios_say_above_one_when_tokenloom_is_better():
    ours = Row("ours", {"load_s": 1.0, "decode_1_tok_s": 30.0, "turn2_ttft_ms": 50.0})
    peer = Row("peer", {"load_s": 2.0, "decode_1_tok_s": 60.0, "prefill_tok_s": 100.0, "turn2_ttft_ms": 100.0})
    assert ratios(ours, [peer, Row("empty")]) == {"peer": {"load_s": 2.0, "decode_1_tok_s": 0.5, "turn2_ttft_ms": 2.0}}


def test_llama_bench_output_is_read_per_test(tmp_path):
    """A stand-in llama-bench printing what the real one prints with -o json: a pp and a tg test, then
    a tg test at a depth for the long-context column."""
    bin_dir = tmp_path / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "build" / "bin"
    bin_dir.mkdir(parents=True)
    exe = bin_dir / "llama-bench"
    exe.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        '  *"-d 512"*) echo \'[{"n_prompt": 0, "n_gen": 16, "n_depth": 512, "avg_ts": 90.5}]\' ;;\n'
        '  *) echo \'[{"n_prompt": 64, "n_gen": 0, "avg_ts": 400.25}, {"n_prompt": 0, "n_gen": 16, "avg_ts": 120.0}]\' ;;\n'
        "esac\n"
    )
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    assert find_llama_cpp(tmp_path) == bin_dir
    values = LlamaBench(bin_dir, tmp_path / "model.gguf", threads=1).measure(QUICK)
    assert values == {"prefill_tok_s": 400.25, "decode_1_tok_s": 120.0, "decode_long_tok_s": 90.5}
    assert find_openvino(tmp_path) is None
