"""Chat-template render budget: every hostile template of issue 10 (and the classes they stand for) is a
ChatTemplateError within 2 s and 200 MB, measured in a fresh process; real templates render exactly as
an unbudgeted sandbox renders them, long conversations included."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import jinja2
import jinja2.ext
import pytest

from tests.hostile_files import HOSTILE_TEMPLATES
from tests.test_chat_template import CONVERSATIONS, CUSTOM_TEMPLATE
from tokenloom.chat_template import ChatTemplate, ChatTemplateError, _tojson
from tokenloom.chat_template_budget import RenderBudget

REPO = Path(__file__).resolve().parent.parent
SECONDS, MEGABYTES = 2.0, 200

# Runs in a fresh process: renders each template, reports its time, outcome and the growth of the
# process's peak resident memory (VmHWM only rises, so the last peak bounds every template's own; unlike
# ru_maxrss it does not start at the parent's size).
_PROBE = r"""
import json, resource, sys, time
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from tokenloom.chat_template import ChatTemplate, ChatTemplateError

def peak_kb():
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

templates = json.load(sys.stdin)
ChatTemplate("{{ messages[0].content }}").render([{"role": "user", "content": "warm up"}])
base = peak_kb()
for name, source in templates.items():
    start = time.perf_counter()
    try:
        ChatTemplate(source).render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
        outcome, message = "rendered", ""
    except ChatTemplateError as exc:
        outcome, message = "ChatTemplateError", str(exc)
    except BaseException as exc:
        outcome, message = type(exc).__name__, str(exc)[:200]
    seconds = time.perf_counter() - start
    grown = (peak_kb() - base) / 1024
    print(json.dumps({"name": name, "outcome": outcome, "message": message[:300], "seconds": seconds,
                      "peak_growth_mb": grown}), flush=True)
"""


@pytest.fixture(scope="module")
def probed() -> dict[str, dict]:
    """Every hostile template rendered once in a fresh process capped at 4 GB of address space."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(4 << 30)], input=json.dumps(HOSTILE_TEMPLATES), capture_output=True,
        text=True, timeout=600, cwd=REPO, env=env,
    )
    results = {}
    for line in done.stdout.splitlines():
        record = json.loads(line)
        results[record["name"]] = record
    assert len(results) == len(HOSTILE_TEMPLATES), f"the probe died (rc {done.returncode}): {done.stderr[-2000:]}"
    print(f"load average {os.getloadavg()}")
    for record in results.values():
        print(f"{record['name']:32s} {record['seconds']:6.3f}s +{record['peak_growth_mb']:6.1f} MB  {record['message'][:90]}")
    return results


@pytest.mark.parametrize("name", sorted(HOSTILE_TEMPLATES))
def test_hostile_template_is_refused_fast_and_small(probed, name):
    record = probed[name]
    assert record["outcome"] == "ChatTemplateError", record
    assert record["seconds"] < SECONDS, record
    assert record["peak_growth_mb"] < MEGABYTES, record


def test_the_issue_templates_name_their_limit(probed):
    """The three templates the issue found, with the limit each one runs into."""
    assert "max_loop_iterations" in probed["nested_range_loops"]["message"]
    assert "max_output_chars" in probed["string_times_1e9"]["message"]
    assert "max_int_bits" in probed["huge_power_to_string"]["message"]
    assert "max_seconds" in probed["exponential_recursive_loop"]["message"] or (
        "max_loop_iterations" in probed["exponential_recursive_loop"]["message"]
    )
    assert "max_template_chars" in probed["template_too_long"]["message"]


# ---------------------------------------------------------------- real templates render unchanged


def _plain_render(source: str, messages: list[dict], **kwargs) -> str:
    """The same template in jinja's stock immutable sandbox with transformers' globals, no budget."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from tokenloom.chat_template import (
        _GenerationTag,
        _raise_exception,
        _strftime_now,
        _TemplateDict,
        _TemplateNamespace,
    )

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace)
    return env.from_string(source).render(messages=messages, tools=None, documents=None, **kwargs)


@pytest.fixture(scope="module")
def real_templates(smollm2_gguf) -> dict[str, str]:
    from tokenloom.loading.gguf_reader import read_gguf
    from tokenloom.loading.pull import pull

    templates = {"smollm2": read_gguf(smollm2_gguf).metadata["tokenizer.chat_template"], "custom": CUSTOM_TEMPLATE}
    try:
        gemma = pull("gemma3-270m", progress=False)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"gemma3-270m GGUF not available: {exc}")
    # The 270M GGUF is the base model and ships no template: the instruct release's template
    # (google/gemma-3-270m-it) is the one test_gemma3.py checks against transformers.
    from tests.test_gemma3 import GEMMA3_CHAT_TEMPLATE  # (that module needs transformers)

    templates["gemma3"] = read_gguf(gemma).metadata.get("tokenizer.chat_template") or GEMMA3_CHAT_TEMPLATE
    return templates


LONG_CONVERSATIONS = {
    "2000_messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 20}
                      for i in range(2000)],
    "3_MB_message": [{"role": "user", "content": "word " * 600_000}],
}


@pytest.mark.parametrize("template", ["smollm2", "gemma3", "custom"])
def test_real_templates_render_byte_identically(real_templates, template):
    """Same text as the stock sandbox for every test conversation (and two long ones); where the template
    itself raises (Gemma's role alternation), the same message as a ChatTemplateError."""
    source = real_templates[template]
    special = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
    rendered = 0
    for conversation in [*CONVERSATIONS, *LONG_CONVERSATIONS.values()]:
        for add_generation_prompt in (False, True):
            try:
                expected = _plain_render(source, conversation, add_generation_prompt=add_generation_prompt,
                                         **special)
            except jinja2.TemplateError as exc:
                with pytest.raises(ChatTemplateError, match=re.escape(str(exc))):
                    ChatTemplate(source).render(conversation, add_generation_prompt=add_generation_prompt,
                                                special_tokens=special)
                continue
            ours = ChatTemplate(source).render(conversation, add_generation_prompt=add_generation_prompt,
                                               special_tokens=special)
            assert ours == expected
            rendered += 1
    assert rendered >= 20


def test_the_budget_grows_with_the_input():
    """A 3 MB conversation may render 3 MB (and more than 1 MB of output); a template may not add more."""
    echo = "{% for m in messages %}{{ m.content }}{% endfor %}"
    long = [{"role": "user", "content": "x" * 3_000_000}]
    assert len(ChatTemplate(echo).render(long)) == 3_000_000
    with pytest.raises(ChatTemplateError, match="max_output_chars"):
        ChatTemplate("{% for m in messages %}{{ m.content * 5 }}{% endfor %}").render(long)


def test_a_tighter_budget_is_honoured():
    """The server can render request-supplied templates under a budget of its own."""
    source = "{% for i in range(1000) %}{{ i }}{% endfor %}"
    assert ChatTemplate(source).render([{"role": "user", "content": "x"}]).startswith("0123")
    with pytest.raises(ChatTemplateError, match="max_loop_iterations=100"):
        ChatTemplate(source).render([{"role": "user", "content": "x"}], budget=RenderBudget(max_loop_iterations=100))


def test_constant_expressions_still_render():
    """The budget keeps jinja from folding budgeted operations at compile time; they run at render time
    with the same result."""
    source = "{{ 'a' ~ 'b' }} {{ 2 ** 10 }} {{ 'x' * 3 }} {{ [1, 2] + [3] }} {{ '%05d' % 42 }} {{ 'ab' | upper }}" \
             " {{ '{:>4}'.format('z') }} {{ range(3) | list }} {{ ' x ' | trim | center(5) }}"
    expected = _plain_render(source, [])
    assert ChatTemplate(source).render([{"role": "user", "content": "x"}]) == expected == (
        "ab 1024 xxx [1, 2, 3] 00042 AB    z [0, 1, 2]   x  "
    )


def test_renders_in_other_threads_have_budgets_of_their_own():
    """A hostile render running out of budget in one thread does not touch a render in another."""
    results: dict[str, object] = {}

    def render(name: str, source: str) -> None:
        try:
            results[name] = ChatTemplate(source).render([{"role": "user", "content": "hi"}])
        except ChatTemplateError as exc:
            results[name] = exc

    threads = [threading.Thread(target=render, args=("hostile", HOSTILE_TEMPLATES["nested_range_loops"]))]
    threads += [threading.Thread(target=render, args=(f"fine{i}", "{% for i in range(50000) %}{% endfor %}ok"))
                for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert isinstance(results["hostile"], ChatTemplateError)
    assert [results[f"fine{i}"] for i in range(3)] == ["ok"] * 3


def test_input_nested_too_deeply_is_a_template_error():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ChatTemplateError, match="nest too deeply"):
        ChatTemplate("{{ messages }}").render([{"role": "user", "content": deep}])
