"""`tokenloom bench --quick --no-transformers` end to end through the CLI: the table, the JSON."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tokenloom.cli import main


@pytest.fixture(autouse=True)
def _restore_threads():
    """--threads changes torch's global thread count; give the rest of the suite its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|")]


def test_bench_quick_without_transformers(smollm2_gguf, tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    # one thread: on a small shared machine two OpenMP threads can stall each other for seconds
    code = main(["bench", "--quick", "--no-transformers", "--threads", "1", "--json", str(out_json)])
    captured = capsys.readouterr()
    assert code == 0, captured.err

    rows = _table_rows(captured.out)
    header, separator, body = rows[0], rows[1], rows[2:]
    assert header == ["engine", "load (s)", "decode tok/s, 1 stream", "decode tok/s, 4 concurrent x 16",
                      "prefill tok/s, 64-token prompt"]
    assert all(re.fullmatch(r":?-+:?", cell) for cell in separator)
    assert [r[0] for r in body] == ["tokenloom (fp32)"]  # no transformers rows, no ratio row
    assert all(float(cell) > 0 for cell in body[0][1:])
    assert "transformers rows skipped (--no-transformers)" in captured.out
    assert "prefill excluded" in captured.out

    # progress, threads, device and torch version go to stderr
    assert "torch threads: 1" in captured.out
    for phrase in ("torch threads: 1", "torch", "device: ", "tokenloom (fp32): decode", "tokenloom (fp32): prefill"):
        assert phrase in captured.err

    data = json.loads(out_json.read_text())
    assert data["settings"] == {"concurrency": 4, "new_tokens": 16, "prompt_tokens": 64, "repeats": 1}
    values = data["results"]["tokenloom (fp32)"]
    assert set(values) == {"load_s", "decode_1_tok_s", "decode_batch_tok_s", "prefill_tok_s"}
    assert all(v > 0 for v in values.values())
    assert data["ratios_vs_transformers_fp32"] is None


def test_bench_rejects_bad_sizes(capsys):
    assert main(["bench", "--quick", "--no-transformers", "--new-tokens", "1"]) == 1
    assert "--new-tokens must be >= 2" in capsys.readouterr().err
