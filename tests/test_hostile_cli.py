"""The CLI on hostile files: `tokenloom generate` (the console script, in a subprocess) prints one error
line and a hint, exits non-zero and shows no traceback, for each kind of hostile input of issue 10."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.fuzz_corpus import gguf_cases, hf_cases
from tests.hostile_files import HOSTILE_TEMPLATES

TOKENLOOM = Path(sys.executable).with_name("tokenloom")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, tuple[str, ...]]]:
    root = tmp_path_factory.mktemp("hostile_cli")
    gguf = {case.name: case.path for case in gguf_cases(root / "gguf")}
    hf = {case.name: case.path for case in hf_cases(root / "hf")}
    flood = root / "flood.jinja"
    flood.write_text("{% set _ = messages %}" + HOSTILE_TEMPLATES["output_flood"])  # passes the `messages` check
    latin1 = root / "latin1.jinja"
    latin1.write_bytes("{{ 'caf\u00e9' }}".encode("latin-1"))
    good = str(Path(gguf["block_count_1e9"]).with_name("base-llama.gguf"))
    commands: dict[str, tuple[list[str], tuple[str, ...]]] = {
        "layers_1e9": (["--model", gguf["block_count_1e9"]], ("llama.block_count", "1000000000")),
        "head_count_string": (["--model", gguf["head_count_string"]], ("llama.attention.head_count", "'4'")),
        "nan_norm": (["--model", gguf["norm_tensor_nan"]], ("not finite",)),
        "negative_rope_base": (["--model", gguf["freq_base_negative"]], ("llama.rope.freq_base",)),
        "merges_unparsable": (["--model", gguf["merges_unparsable"]], ("tokenizer.ggml.merges[0]",)),
        "nested_metadata": (["--model", gguf["metadata_nested_100k_deep"]], ("MAX_NESTING",)),
        "dimensions_2e20": (["--model", gguf["tensor_with_2e20_dimensions"]], ("1048576 dimensions",)),
        "overlapping_tensors": (["--model", gguf["tensors_overlap"]], ("overlap",)),
        "truncated": (["--model", gguf["magic_only"]], ("truncated",)),
        "shard_outside": (["--model", hf["shard_dotdot"]], ("../outside.safetensors",)),
        "gguf_file_outside": (["--model", hf["gguf_file_dotdot"], "--gguf-file", "../base-qwen2.gguf"],
                              ("gguf_file",)),
        "config_missing_key": (["--model", hf["config_missing_heads"]], ("num_attention_heads",)),
        "config_not_utf8": (["--model", hf["config_not_utf8"]], ("not UTF-8",)),
        "template_in_gguf": (["--model", gguf["gguf_chat_template_nested_range_loops"], "--chat"],
                             ("max_loop_iterations",)),
        "template_file": (["--model", good, "--chat", "--chat-template", str(flood)], ("max_output_chars",)),
        "template_file_not_utf8": (["--model", good, "--chat", "--chat-template", str(latin1)], ("utf-8",)),
    }
    env = {**os.environ, "TOKENLOOM_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TOKENLOOM_DEBUG", None)

    def run(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([str(TOKENLOOM), "generate", "hi", "-n", "2", *args], capture_output=True, text=True,
                              timeout=300, env=env)

    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(commands, pool.map(run, [args for args, _ in commands.values()])))
    return {name: (done[name], fragments) for name, (_, fragments) in commands.items()}


CASES = ["layers_1e9", "head_count_string", "nan_norm", "negative_rope_base", "merges_unparsable", "nested_metadata",
         "dimensions_2e20", "overlapping_tensors", "truncated", "shard_outside", "gguf_file_outside",
         "config_missing_key", "config_not_utf8", "template_in_gguf", "template_file", "template_file_not_utf8"]


@pytest.mark.parametrize("name", CASES)
def test_cli_error_is_one_line_and_a_hint(runs, name):
    done, fragments = runs[name]
    assert done.returncode != 0, done
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("tokenloom: error: ")]
    assert len(errors) == 1, done.stderr
    assert errors[0] + 1 < len(lines) and lines[errors[0] + 1].startswith("hint: "), done.stderr
    assert errors[0] + 2 == len(lines), f"nothing follows the hint: {done.stderr}"
    for fragment in fragments:
        assert fragment in lines[errors[0]], (fragment, lines[errors[0]])
