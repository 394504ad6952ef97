"""The `tokenloom` command line: generate, --chat, chat, pull, and its one-line errors.

Continuations are compared with transformers' greedy decoding of the same GGUF (the oracle).
"""

from __future__ import annotations

import builtins
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokenloom.cli import main
from tokenloom.loading.pull import list_pullable

PROMPT = "A list of colors: red, blue"
NEW_TOKENS = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hf_greedy_text(hf_smollm2, ids: list[int], max_new_tokens: int = NEW_TOKENS) -> str:
    model, tok = hf_smollm2
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def hf_chat_ids(hf_smollm2, messages: list[dict[str, str]]) -> list[int]:
    _, tok = hf_smollm2
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


def error_lines(stderr: str) -> list[str]:
    """stderr without progress bars / load notes (none are expected before an error anyway)."""
    return [line for line in stderr.splitlines() if line.strip()]


# ---------------------------------------------------------------- generate


def test_generate_prints_prompt_and_greedy_continuation(smollm2_gguf, hf_smollm2, capsys):
    code = main(["generate", PROMPT, "--model", str(smollm2_gguf), "--dtype", "float32", "-n", str(NEW_TOKENS)])
    out = capsys.readouterr()
    assert code == 0
    _, tok = hf_smollm2
    expected = hf_greedy_text(hf_smollm2, tok(PROMPT).input_ids)
    assert expected.strip()
    assert out.out == PROMPT + expected + "\n"
    assert "Traceback" not in out.err


def test_generate_stop_flag_cuts_the_output_before_the_stop_text(smollm2_gguf, hf_smollm2, capsys):
    _, tok = hf_smollm2
    expected = hf_greedy_text(hf_smollm2, tok(PROMPT).input_ids, max_new_tokens=16)
    words = expected.split()
    assert len(words) >= 3, expected
    stop = words[2]  # a word well inside the greedy continuation
    code = main(["generate", PROMPT, "--model", str(smollm2_gguf), "--dtype", "float32", "-n", "16", "--stop", stop,
                 "--no-echo"])
    out = capsys.readouterr()
    assert code == 0
    assert out.out == expected[: expected.index(stop)] + "\n"


def test_generate_chat_template_flag_replaces_the_models_template(smollm2_gguf, hf_smollm2, tmp_path, capsys):
    template = tmp_path / "qa.jinja"
    template.write_text("{% for m in messages %}Question: {{ m['content'] }}\n{% endfor %}Answer:")
    code = main(["generate", "What is the capital of France?", "--model", str(smollm2_gguf), "--chat",
                 "--chat-template", str(template), "--dtype", "float32", "-n", str(NEW_TOKENS)])
    out = capsys.readouterr()
    assert code == 0
    _, tok = hf_smollm2
    ids = tok("Question: What is the capital of France?\nAnswer:", add_special_tokens=False).input_ids
    assert out.out == hf_greedy_text(hf_smollm2, ids) + "\n"


def test_missing_chat_template_file_is_an_error_before_loading(smollm2_gguf, tmp_path, capsys):
    code = main(["generate", "hi", "--model", str(smollm2_gguf), "--chat", "--chat-template",
                 str(tmp_path / "absent.jinja")])
    err = capsys.readouterr().err
    assert code == 1
    lines = error_lines(err)
    assert len(lines) == 2 and "--chat-template" in lines[0] and "absent.jinja" in lines[0]
    assert "loaded" not in err


def test_generate_chat_sends_the_prompt_through_the_chat_template(smollm2_gguf, hf_smollm2, capsys):
    question = "What is the capital of France?"
    code = main(["generate", question, "--chat", "--model", str(smollm2_gguf), "--dtype", "float32", "-n", str(NEW_TOKENS)])
    out = capsys.readouterr()
    assert code == 0
    expected = hf_greedy_text(hf_smollm2, hf_chat_ids(hf_smollm2, [{"role": "user", "content": question}]))
    assert out.out == expected + "\n"  # no echo of the templated prompt


def test_chat_reads_stdin_and_prints_replies(smollm2_gguf, hf_smollm2, capsys, monkeypatch):
    lines = iter(["hello", "/exit"])
    prompts = []

    def fake_input(prompt: str = "") -> str:
        prompts.append(prompt)
        return next(lines)

    monkeypatch.setattr(builtins, "input", fake_input)
    code = main(["chat", "--model", str(smollm2_gguf), "--dtype", "float32", "-n", str(NEW_TOKENS)])
    out = capsys.readouterr()
    assert code == 0
    assert prompts == ["> ", "> "]  # asked twice: "hello", then "/exit"
    expected = hf_greedy_text(hf_smollm2, hf_chat_ids(hf_smollm2, [{"role": "user", "content": "hello"}]))
    assert expected.strip()
    assert out.out == expected + "\n"


def test_chat_ends_on_eof(smollm2_gguf, capsys, monkeypatch):
    def eof(prompt: str = "") -> str:
        raise EOFError

    monkeypatch.setattr(builtins, "input", eof)
    assert main(["chat", "--model", str(smollm2_gguf)]) == 0
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------- pull


def test_pull_prints_the_cached_path_last(smollm2_gguf, capsys):
    code = main(["pull", "smollm2-135m-instruct"])
    out = capsys.readouterr()
    assert code == 0
    last = out.out.strip().splitlines()[-1]
    assert Path(last).is_file()
    assert Path(last) == smollm2_gguf


def test_pull_without_a_name_lists_the_names(capsys):
    assert main(["pull"]) == 0
    names = capsys.readouterr().out.split()
    assert names == list_pullable()
    assert "smollm2-135m-instruct" in names


def test_pull_unknown_name_is_a_one_line_error(capsys):
    assert main(["pull", "no-such-model-xyz"]) == 1
    err = error_lines(capsys.readouterr().err)
    assert err[0].startswith("tokenloom: error: ") and "no-such-model-xyz" in err[0]
    assert len(err) <= 2 and all(not line.startswith("Traceback") for line in err)


# ---------------------------------------------------------------- errors


def test_missing_model_path_is_one_error_line_and_a_hint(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "model.gguf"
    code = main(["generate", "hi", "--model", str(missing)])
    err = capsys.readouterr().err
    assert code == 1
    lines = error_lines(err)
    assert len(lines) == 2, err
    assert lines[0].startswith("tokenloom: error: ") and str(missing) in lines[0]
    assert lines[1].startswith("hint: ")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("flag", "value", "name"),
    [("--temperature", "-1", "temperature"), ("--top-p", "1.5", "top_p"), ("--top-k", "-2", "top_k"),
     ("--min-p", "1.5", "min_p"), ("--repetition-penalty", "0", "repetition_penalty"),
     ("--no-repeat-ngram-size", "-1", "no_repeat_ngram_size")],
)
def test_invalid_sampling_flag_is_a_one_line_error(smollm2_gguf, capsys, flag, value, name):
    code = main(["generate", "hi", "--model", str(smollm2_gguf), flag, value])
    err = capsys.readouterr().err
    assert code == 1
    lines = error_lines(err)
    assert lines[0].startswith("tokenloom: error: ")
    assert name in lines[0] and value in lines[0]
    assert len(lines) == 2 and lines[1].startswith("hint: ")
    assert "loaded" not in err  # rejected before the model is loaded
    assert "Traceback" not in err


def test_console_entry_point_reports_errors_without_traceback(tmp_path):
    script = Path(sys.executable).parent / "tokenloom"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "tokenloom.cli"]
    missing = tmp_path / "absent.gguf"
    result = subprocess.run(
        [*command, "generate", "hi", "--model", str(missing)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    lines = error_lines(result.stderr)
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith("tokenloom: error: ") and str(missing) in lines[0]
    assert lines[1].startswith("hint: ")
    assert result.stdout == ""
