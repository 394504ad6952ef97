"""`tokenloom chat` on a pseudo-terminal (pexpect), as a person uses it: /help, arrow-key history,
two turns whose replies are transformers' greedy replies to the whole conversation so far, Ctrl-C in
the middle of a reply (the prompt comes back, the conversation is intact), /save, /reset, /exit, and
the typed lines kept in the cache directory's history file."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

pexpect = pytest.importorskip("pexpect")

SCRIPT = Path(sys.executable).parent / "tokenloom"
MAX_NEW_TOKENS = 24
PROMPT = "you> "
REPLY = "assistant> "


def hf_reply(hf_smollm2, messages: list[dict[str, str]]) -> str:
    """transformers' greedy reply to the conversation, as the chat would print it."""
    model, tok = hf_smollm2
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.fixture
def chat(smollm2_gguf, tmp_path):
    env = {**os.environ, "TOKENLOOM_HOME": str(tmp_path / "home"), "NO_COLOR": "1", "TERM": "xterm",
           "TOKENLOOM_NUM_THREADS": "1"}  # fmt: skip
    child = pexpect.spawn(str(SCRIPT), ["chat", "-m", str(smollm2_gguf), "-n", str(MAX_NEW_TOKENS), "--stats"],
                          env=env, encoding="utf-8", timeout=600, dimensions=(40, 200))  # fmt: skip
    child.expect_exact(PROMPT)  # the model is loaded
    yield child
    if child.isalive():
        child.terminate(force=True)


def _saved(child, path: Path, count: int) -> list[dict[str, str]]:
    child.sendline(f"/save {path}")
    child.expect_exact(f"(saved {count} messages to {path})")
    child.expect_exact(PROMPT)
    return json.loads(path.read_text(encoding="utf-8"))


def test_chat_repl_session(chat, hf_smollm2, tmp_path):
    child = chat
    child.sendline("/help")
    child.expect_exact("/reset")
    child.expect_exact(PROMPT)
    child.send("\x1b[A")  # arrow up: readline brings back "/help"
    child.send("\r")
    child.expect_exact("/reset")  # the help again
    child.expect_exact(PROMPT)
    assert "^[[A" not in child.before

    conversation: list[dict[str, str]] = []
    for question in ("What is the capital of France?", "And what is the capital of Spain?"):
        conversation.append({"role": "user", "content": question})
        child.sendline(question)
        child.expect_exact(REPLY)
        child.expect(r"\((\d+) tokens, [\d.]+ tok/s, first token after [\d.]+s\)")  # --stats
        child.expect_exact(PROMPT)
        expected = hf_reply(hf_smollm2, conversation)  # the reply to the whole conversation so far
        conversation.append({"role": "assistant", "content": expected})
    assert _saved(child, tmp_path / "two-turns.json", 4) == conversation

    child.sendline("Write a long story about a dragon who learns to read.")
    child.expect_exact(REPLY)
    child.expect(r"\w")  # the reply has begun
    child.sendintr()  # Ctrl-C
    child.expect_exact("(reply stopped")
    child.expect_exact(PROMPT)
    after = _saved(child, tmp_path / "interrupted.json", 6)
    assert after[:4] == conversation  # the conversation is intact
    assert after[4] == {"role": "user", "content": "Write a long story about a dragon who learns to read."}
    full = hf_reply(hf_smollm2, after[:5])
    partial = after[5]["content"]
    assert full.startswith(partial) and len(partial) < len(full)  # what was shown before Ctrl-C, no more

    child.sendline("/nonsense")
    child.expect_exact("unknown command /nonsense")
    child.expect_exact(PROMPT)
    child.sendline("/reset")
    child.expect_exact("(conversation cleared)")
    child.expect_exact(PROMPT)
    assert _saved(child, tmp_path / "reset.json", 0) == []
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    history = (tmp_path / "home" / "chat_history").read_text(encoding="utf-8").splitlines()
    for line in ("/help", "What is the capital of France?", "And what is the capital of Spain?", "/reset", "/exit"):
        assert line in history
