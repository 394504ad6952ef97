"""A failing step, a broken engine and a model without a chat template (SmolLM2 with its template
removed), one server for the module."""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
import pytest

from tests.serving_helpers import start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(one_torch_thread):
    from tokenloom import LLM

    llm = LLM("smollm2-135m-instruct")
    llm.tokenizer.data = dataclasses.replace(llm.tokenizer.data, chat_template=None)  # like a base model
    running = start_server(llm)
    yield running
    running.stop()
    llm.close()


def _complete(client: httpx.Client, prompt: list[int]) -> httpx.Response:
    return client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True})


def test_a_model_without_a_chat_template_says_how_to_serve_chat(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400
    assert "--chat-template" in response.json()["error"]["message"]


def test_a_step_that_raises_fails_only_the_requests_it_touched(server):
    runner = server.llm.engine.runner
    real_step = runner.step
    state = {"armed": False}

    def step(out):
        if state["armed"] and len(out.scheduled) == 2:
            state["armed"] = False
            raise RuntimeError("injected step failure")
        return real_step(out)

    runner.step = step
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            expected = _complete(client, [5, 6, 7]).json()["choices"][0]["text"]

            async def pair():
                async with httpx.AsyncClient(base_url=server.url, timeout=60) as aclient:
                    body = {"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
                    return await aclient.post("/v1/completions", json=body)

            state["armed"] = True
            failed = asyncio.run(pair())
            assert failed.status_code == 500 and "injected step failure" in failed.json()["error"]["message"]
            assert server.idle()
            again = _complete(client, [5, 6, 7])  # the next request is served, with the same answer
            assert again.status_code == 200 and again.json()["choices"][0]["text"] == expected
            assert client.get("/health").status_code == 200
    finally:
        runner.step = real_step


def test_a_broken_engine_turns_health_to_503(server):
    """Last in this module: it breaks the engine loop for good."""
    scheduler = server.llm.engine.scheduler

    def broken():
        raise RuntimeError("scheduler state corrupted")

    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.get("/health").status_code == 200
        scheduler.schedule = broken
        response = _complete(client, [5, 6])
        assert response.status_code in (500, 503)
        health = client.get("/health")
        assert health.status_code == 503 and "scheduler state corrupted" in health.json()["error"]
        refused = _complete(client, [5, 6])
        assert refused.status_code == 503 and "engine" in refused.json()["error"]["message"]
