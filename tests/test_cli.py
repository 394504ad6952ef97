"""The `tokenloom` command line, in process: generate, --chat, chat, pull, and the chat REPL's commands.

Continuations are compared with transformers' greedy decoding of the same GGUF (the oracle). The
console script itself, run as a subprocess, is tested in test_cli_console.py; the REPL on a
pseudo-terminal in test_chat_repl.py.
"""

from __future__ import annotations

import builtins
import json

import pytest
import torch

from tokenloom.cli import main
from tokenloom.cli.chat import ChatSession
from tokenloom.loading.pull import list_pullable

PROMPT = "A list of colors: red, blue"
NEW_TOKENS = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _one_cli_thread(monkeypatch):
    """The CLI sets torch's thread count itself: one, as the rest of the suite (a shared 2-core machine)."""
    monkeypatch.setenv("TOKENLOOM_NUM_THREADS", "1")


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
    """stderr without blank lines (no progress bar or note is expected before an error anyway)."""
    return [line for line in stderr.splitlines() if line.strip()]


def fake_inputs(monkeypatch, lines: list[str | type[BaseException]]) -> list[str]:
    """`input()` returns (or raises) these in turn; the prompts it was given are collected."""
    queue, prompts = list(lines), []

    def fake_input(prompt: str = "") -> str:
        prompts.append(prompt)
        item = queue.pop(0)
        if isinstance(item, type):
            raise item
        return item

    monkeypatch.setattr(builtins, "input", fake_input)
    return prompts


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
    assert "\r" not in out.err  # no progress bar when stderr is not a terminal
    assert "(float32, " in out.err  # the load line names the exact mode


def test_the_load_line_names_the_default_modes_kernels(smollm2_gguf, capsys):
    assert main(["generate", PROMPT, "--model", str(smollm2_gguf), "-n", "2"]) == 0
    assert "(int4 kernels, float32 activations, " in capsys.readouterr().err


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


def test_generate_chat_with_a_system_message(smollm2_gguf, hf_smollm2, capsys):
    question, system = "What is the capital of France?", "Answer in French."
    code = main(["generate", question, "--chat", "--system", system, "--model", str(smollm2_gguf),
                 "-n", str(NEW_TOKENS), "-q"])
    out = capsys.readouterr()
    assert code == 0
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    assert out.out == hf_greedy_text(hf_smollm2, hf_chat_ids(hf_smollm2, messages)) + "\n"
    assert out.err == ""  # -q: no "loaded" line


def test_generate_reads_the_prompt_from_stdin_and_from_a_file(smollm2_gguf, hf_smollm2, tmp_path, capsys, monkeypatch):
    import io

    _, tok = hf_smollm2
    expected = PROMPT + hf_greedy_text(hf_smollm2, tok(PROMPT).input_ids) + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT + "\n"))  # the newline `echo` adds is dropped
    assert main(["generate", "-", "--model", str(smollm2_gguf), "--dtype", "float32", "-n", str(NEW_TOKENS)]) == 0
    assert capsys.readouterr().out == expected
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT + "\n", encoding="utf-8")
    assert main(["generate", "--file", str(prompt_file), "--model", str(smollm2_gguf), "--dtype", "float32", "-n", str(NEW_TOKENS)]) == 0
    assert capsys.readouterr().out == expected


def test_generate_chat_sends_the_prompt_through_the_chat_template(smollm2_gguf, hf_smollm2, capsys):
    question = "What is the capital of France?"
    code = main(["generate", question, "--chat", "--model", str(smollm2_gguf), "--dtype", "float32", "-n", str(NEW_TOKENS)])
    out = capsys.readouterr()
    assert code == 0
    expected = hf_greedy_text(hf_smollm2, hf_chat_ids(hf_smollm2, [{"role": "user", "content": question}]))
    assert out.out == expected + "\n"  # no echo of the templated prompt


# ---------------------------------------------------------------- chat (not on a terminal)


def test_chat_reads_stdin_and_prints_replies(smollm2_gguf, hf_smollm2, capsys, monkeypatch):
    prompts = fake_inputs(monkeypatch, ["hello", "/exit"])
    code = main(["chat", "--model", str(smollm2_gguf), "--dtype", "float32", "-n", str(NEW_TOKENS)])
    out = capsys.readouterr()
    assert code == 0
    assert prompts == ["", ""]  # asked twice ("hello", then "/exit"); no prompt text without a terminal
    ids = hf_chat_ids(hf_smollm2, [{"role": "user", "content": "hello"}])
    expected = hf_greedy_text(hf_smollm2, ids)
    assert expected.strip()
    assert out.out == expected + "\n"  # only the reply: no speaker markers in a pipe
    model, tok = hf_smollm2
    with torch.no_grad():
        new = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(ids):]
    hit_limit = len(new) == NEW_TOKENS and int(new[-1]) not in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"))
    assert (f"token limit, --max-new-tokens {NEW_TOKENS}" in out.err) == hit_limit  # says so when cut off


def test_chat_ends_on_eof(smollm2_gguf, capsys, monkeypatch):
    fake_inputs(monkeypatch, [EOFError])
    assert main(["chat", "--model", str(smollm2_gguf)]) == 0
    assert capsys.readouterr().out == ""


class FakeLLM:
    """What ChatSession needs of an LLM: chat_prompt and stream (each reply is 'reply N')."""

    def __init__(self, template_error: str | None = None) -> None:
        self.conversations: list[list[dict[str, str]]] = []
        self.template_error = template_error

    def chat_prompt(self, messages, chat_template=None):
        if self.template_error:
            raise ValueError(self.template_error)
        return [len(messages)]

    def stream(self, prompt_ids, params):
        from tokenloom.outputs import RequestOutput

        n = sum(1 for _ in self.conversations) + 1
        self.conversations.append([])
        for i, piece in enumerate(["reply", f" {n}"]):
            yield RequestOutput("r", prompt_ids, [i], text_delta=piece, finished=i == 1,
                               finish_reason="eos" if i == 1 else None)


def _session(llm, system=None):
    import argparse

    args = argparse.Namespace(system=system, model="m", stats=False, quiet=False)
    params = argparse.Namespace(max_tokens=8)
    return ChatSession(llm, params, args, None)


def test_repl_commands(tmp_path, capsys, monkeypatch):
    saved = tmp_path / "conversation.json"
    fake_inputs(monkeypatch, [
        "hi", "/help", "/system Be brief.", "/system", "//slash text", "/sav", f"/save {saved}", "/reset",
        f"/save {tmp_path / 'after-reset.json'}", "/save", f"/save {tmp_path / 'no' / 'dir.json'}", "/quit",
    ])  # fmt: skip
    session = _session(FakeLLM())
    assert session.loop() == 0
    out = capsys.readouterr()
    assert out.out == "reply 1\nreply 2\n"
    assert json.loads(saved.read_text()) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "reply 1"},
        {"role": "user", "content": "/slash text"}, {"role": "assistant", "content": "reply 2"},
    ]
    assert json.loads((tmp_path / "after-reset.json").read_text()) == [{"role": "system", "content": "Be brief."}]
    err = out.err
    assert "/reset" in err and "/save FILE" in err  # /help
    assert "(system message set)" in err and "(system message: 'Be brief.')" in err
    assert "tokenloom: error: unknown command /sav\nhint: did you mean /save?" in err
    assert "conversation cleared, system message kept" in err
    assert "tokenloom: error: /save needs a file name" in err
    assert "could not write" in err and "dir.json" in err


def test_repl_ctrl_c_twice_at_the_prompt_exits(capsys, monkeypatch):
    fake_inputs(monkeypatch, ["hi", KeyboardInterrupt, "again", KeyboardInterrupt, KeyboardInterrupt])
    session = _session(FakeLLM())
    assert session.loop() == 0
    err = capsys.readouterr().err
    assert err.count("Ctrl-C again or Ctrl-D to quit") == 2  # a lone Ctrl-C only says how to quit
    assert [m["content"] for m in session.messages] == ["hi", "reply 1", "again", "reply 2"]


# ---------------------------------------------------------------- pull


def test_pull_prints_the_cached_path_last(smollm2_gguf, capsys):
    code = main(["pull", "smollm2-135m-instruct"])
    out = capsys.readouterr()
    assert code == 0
    assert out.out.splitlines() == [str(smollm2_gguf)]


def test_pull_without_a_name_lists_the_names_with_size_license_and_state(smollm2_gguf, capsys):
    from tokenloom.loading.pull import PULL_MODELS, cached_model_path

    assert main(["pull"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[:4] == ["NAME", "SIZE", "LICENSE", "CACHED"]
    assert [row.split()[0] for row in rows[1:]] == list_pullable()
    for row in rows[1:]:
        name = row.split()[0]
        spec = PULL_MODELS[name]
        assert f"{spec.size / 1e6:.1f} MB" in row and spec.license in row
        assert (" yes " in row) == (cached_model_path(name) is not None)
    assert " yes " in next(row for row in rows if row.startswith("smollm2-135m-instruct"))


def test_pull_unknown_name_is_a_one_line_error(capsys):
    assert main(["pull", "smolm2"]) == 1
    err = error_lines(capsys.readouterr().err)
    assert err[0].startswith("tokenloom: error: ") and "smolm2" in err[0]
    assert err[1] == "hint: did you mean smollm2-135m-instruct?"
    assert len(err) == 2


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
    ("flag", "value"),
    [("--temperature", "-1"), ("--top-p", "1.5"), ("--top-k", "-2"), ("--min-p", "1.5"),
     ("--repetition-penalty", "0"), ("--no-repeat-ngram-size", "-1"), ("--presence-penalty", "3"),
     ("--seed", "-1")],
)
def test_invalid_sampling_flag_is_a_one_line_error_naming_the_flag(capsys, flag, value):
    code = main(["generate", "hi", "--model", "/nonexistent/model.gguf", flag, value])
    err = capsys.readouterr().err
    assert code == 2
    lines = error_lines(err)
    assert lines[0].startswith(f"tokenloom: error: {flag} must ") and value in lines[0]  # not top_p
    assert len(lines) == 2 and lines[1].startswith("hint: ")
    assert "no model at" not in err  # rejected before the model is looked for
