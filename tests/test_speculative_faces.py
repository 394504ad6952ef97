"""Speculative decoding through the CLI and the server: `generate` / `chat` --prompt-lookup and
--draft-model, `serve` --speculative-method, and the counts on /metrics.

Greedy speculation must give exactly the text of plain greedy decoding (float32, the exact mode); the
flag checks run before any model is looked for.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.serving_helpers import start_server
from tokenloom.cli import build_parser, main
from tokenloom.sampling_params import SamplingParams
from tokenloom.serving.cli import engine_config_from_args
from tokenloom.speculative_config import SpeculativeConfig

TEXT = "The old lighthouse stood at the edge of the cliff for more than a hundred years."
REPEAT = f"Repeat this sentence exactly: {TEXT}"
NEW_TOKENS = 24

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _one_cli_thread(monkeypatch):
    monkeypatch.setenv("TOKENLOOM_NUM_THREADS", "1")


def _generate_json(model, capsys, *flags: str) -> dict:
    code = main(["generate", "--chat", REPEAT, "--model", str(model), "--dtype", "float32", "-n", str(NEW_TOKENS),
                 "--json", "-q", *flags])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


# ---------------------------------------------------------------- generate / chat


def test_generate_with_prompt_lookup_gives_the_plain_greedy_text(smollm2_gguf, capsys):
    plain = _generate_json(smollm2_gguf, capsys)
    lookup = _generate_json(smollm2_gguf, capsys, "--prompt-lookup", "4")
    assert TEXT in plain["text"]  # the model does repeat it: prompt lookup has something to find
    assert lookup["text"] == plain["text"] and lookup["token_ids"] == plain["token_ids"]
    assert "speculative" not in plain
    stats = lookup["speculative"]
    assert stats["num_proposed_tokens"] > 0 and stats["num_accepted_tokens"] > 0


def test_generate_with_a_draft_model_gives_the_plain_greedy_text(smollm2_gguf, capsys):
    plain = _generate_json(smollm2_gguf, capsys, "-n", "10")
    # the model as its own draft: every proposal is accepted
    draft = _generate_json(smollm2_gguf, capsys, "-n", "10", "--draft-model", str(smollm2_gguf),
                           "--num-speculative-tokens", "3")
    assert draft["text"] == plain["text"] and draft["token_ids"] == plain["token_ids"]
    stats = draft["speculative"]
    assert stats["num_proposed_tokens"] > 0 and stats["num_accepted_tokens"] == stats["num_proposed_tokens"]


def test_chat_with_prompt_lookup_gives_the_plain_reply(smollm2_gguf, capsys, monkeypatch):
    import tokenloom.cli.chat as chat

    loaded, replies = [], []

    def load_llm(*args, **kwargs):
        loaded.append(real_load_llm(*args, **kwargs))
        return loaded[-1]

    real_load_llm = chat.load_llm
    monkeypatch.setattr(chat, "load_llm", load_llm)
    for flags in ([], ["--prompt-lookup", "4"]):
        lines = iter([REPEAT, "/exit"])
        monkeypatch.setattr("builtins.input", lambda prompt="", lines=lines: next(lines))
        code = main(["chat", "--model", str(smollm2_gguf), "--dtype", "float32", "-n", "16", "-q", *flags])
        out = capsys.readouterr()
        assert code == 0, out.err
        replies.append(out.out)
    assert replies[0].strip() and replies[1] == replies[0]
    plain, lookup = (llm.engine for llm in loaded)
    assert plain.config.enable_prefix_caching and lookup.config.enable_prefix_caching  # chat keeps its cache
    assert plain.speculative_stats.num_proposed_tokens == 0 < lookup.speculative_stats.num_proposed_tokens


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "hi", "--prompt-lookup", "3", "--draft-model", "d.gguf"], "--prompt-lookup and --draft-model"),
        (["generate", "hi", "--num-speculative-tokens", "3"], "--num-speculative-tokens needs --draft-model"),
        (["generate", "hi", "--prompt-lookup", "0"], "argument --prompt-lookup: expected an integer in [1, 64]"),
        (["chat", "--prompt-lookup", "2", "--num-speculative-tokens", "3"], "--num-speculative-tokens needs"),
        (["serve", "--speculative-method", "draft_model"], "--speculative-method draft_model needs --draft-model"),
        (["serve", "--speculative-method", "ngram", "--draft-model", "d.gguf"], "--draft-model is used only with"),
        (["serve", "--draft-model", "d.gguf"], "--draft-model needs --speculative-method draft_model"),
        (["serve", "--num-speculative-tokens", "4"], "--num-speculative-tokens needs --speculative-method"),
        (["serve", "--speculative-method", "eagle"], "argument --speculative-method: invalid choice"),
        (["serve", "--speculative-method", "ngram", "--num-speculative-tokens", "65"], "expected an integer in"),
    ],
)
def test_bad_speculative_flags_are_a_one_line_usage_error(capsys, argv, message):
    code = main([*argv, "--model", "/nonexistent/model.gguf"])
    err = capsys.readouterr().err
    assert code == 2
    lines = _error_lines(err)
    assert lines[0].startswith("tokenloom: error: ") and message in lines[0], lines
    assert len(lines) == 2 and lines[1].startswith("hint: ")
    assert "no model at" not in err  # refused before the model is looked for


# ---------------------------------------------------------------- serve


def _serve_config(*flags: str):
    return engine_config_from_args(build_parser().parse_args(["serve", *flags]))


def test_serve_flags_build_the_engine_config():
    config = _serve_config("--speculative-method", "ngram", "--num-speculative-tokens", "4")
    assert config.speculative == SpeculativeConfig("prompt_lookup", num_speculative_tokens=4)
    assert config.enable_prefix_caching  # the other serve defaults stay
    assert _serve_config().speculative is None
    assert _serve_config("--speculative-method", "prompt_lookup").speculative.num_speculative_tokens == 5
    draft = _serve_config("--speculative-method", "draft", "--draft-model", "d.gguf", "--max-num-seqs", "3")
    assert draft.speculative == SpeculativeConfig("draft_model", 5) and draft.max_num_seqs == 3
    assert not _serve_config("--no-prefix-cache").enable_prefix_caching  # on unless turned off


@pytest.fixture(scope="module")
def server(smollm2_gguf, one_torch_thread):
    from tokenloom import LLM
    from tokenloom.config import EngineConfig

    spec = SpeculativeConfig("prompt_lookup", num_speculative_tokens=4)
    llm = LLM(str(smollm2_gguf), dtype="float32", engine_config=EngineConfig(enable_prefix_caching=True,
                                                                             speculative=spec))
    running = start_server(llm)
    yield running
    running.stop()
    llm.close()


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def test_server_speculates_on_every_request_with_the_plain_greedy_text(server):
    messages = [{"role": "user", "content": REPEAT}]
    reply = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": "smollm2", "messages": messages, "max_tokens": NEW_TOKENS, "temperature": 0})
    assert reply.status_code == 200, reply.text
    text = reply.json()["choices"][0]["message"]["content"]
    metrics = httpx.get(server.url + "/metrics").text
    drafted = _metric(metrics, "tokenloom:spec_decode_num_draft_tokens")
    accepted = _metric(metrics, "tokenloom:spec_decode_num_accepted_tokens")
    assert drafted > 0 and 0 < accepted <= drafted
    assert _metric(metrics, "tokenloom:spec_decode_num_drafts") > 0
    assert _metric(metrics, "tokenloom:spec_decode_draft_acceptance_rate") == pytest.approx(accepted / drafted)

    # the reference: the same request with speculation turned off for it (0 speculative tokens)
    off = SpeculativeConfig("prompt_lookup", num_speculative_tokens=0)
    (plain,) = server.llm.generate([server.llm.chat_prompt(messages)],
                                   SamplingParams(temperature=0, max_tokens=NEW_TOKENS, speculative=off))
    assert TEXT in plain.text
    assert text == plain.text
    assert _metric(httpx.get(server.url + "/metrics").text, "tokenloom:spec_decode_num_draft_tokens") == drafted
