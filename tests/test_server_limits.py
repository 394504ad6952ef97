"""Limits, errors and cancellation of `tokenloom serve` (real SmolLM2, one server per module)."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from tests.serving_helpers import start_server
from tokenloom.serving import ServerConfig

pytestmark = pytest.mark.slow
KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(one_torch_thread):
    from tokenloom import LLM

    llm = LLM("smollm2-135m-instruct")
    config = ServerConfig(served_model_name="smollm2", api_key=KEY, max_concurrent_requests=16, max_queue=16,
                          max_total_tokens=512, max_input_tokens=300, max_body_bytes=32 * 1024)
    running = start_server(llm, config)
    yield running
    running.stop()
    llm.close()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as client:
        yield client


def _metric(http, name: str) -> float:
    text = http.get("/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def _error(response, status: int, *needles: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    for needle in needles:
        assert needle in body["message"], body["message"]
    return body


def test_each_error_row_has_its_status_and_names_the_problem(server, http):
    base = {"model": "smollm2", "prompt": "Hello", "max_tokens": 4}
    body = _error(http.post("/v1/completions", json={**base, "temperature": -0.5}), 400, "temperature", "-0.5")
    assert body["param"] == "temperature"
    _error(http.post("/v1/completions", json={**base, "top_p": 7}), 400, "top_p", "(0, 1]", "7")
    _error(http.post("/v1/completions", json={**base, "seed": 2**64}), 400, "seed", "2**63")
    _error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                  "max_completion_tokens": 0}), 400, "max_completion_tokens", "0")
    _error(http.post("/v1/completions", json={**base, "max_tokens": "many"}), 400, "max_tokens", "'many'")
    _error(http.post("/v1/completions", json={**base, "bogus": 1}), 400, "bogus", "not a supported parameter")
    _error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                  "tools": [{"type": "function"}]}), 400, "tools")
    _error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                  "response_format": {"type": "xml"}}), 400, "response_format")
    # prompt + max_tokens past the configured total: the numbers are in the message
    _error(http.post("/v1/completions", json={**base, "max_tokens": 600}), 400, "512", "600", "max_tokens")
    long_prompt = "word " * 400
    _error(http.post("/v1/completions", json={**base, "prompt": long_prompt}), 400, "300", "input tokens")
    body = _error(http.post("/v1/completions", json={**base, "model": "gpt-9"}), 404, "gpt-9")
    assert body["param"] == "model"
    _error(http.post("/v1/completions", json={**base, "prompt": "x" * 40000}), 413, "32768")
    _error(http.post("/v1/completions", content=b'{"prompt": "x", ', headers={"Content-Type": "application/json"}),
           400, "not valid JSON")
    _error(http.post("/v1/completions", content=b"[1, 2]", headers={"Content-Type": "application/json"}), 400,
           "JSON object")
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        _error(anonymous.post("/v1/completions", json=base), 401, "missing API key")
        _error(anonymous.post("/v1/completions", json=base, headers={"Authorization": "Bearer wrong"}), 401, "invalid")
        assert anonymous.get("/health").status_code == 200  # probes stay open
    # TGI's shape and status
    response = http.post("/generate", json={"inputs": "Hello", "parameters": {"top_p": 3}})
    assert response.status_code == 422 and response.json()["error_type"] == "validation"
    assert "top_p" in response.json()["error"] and "3" in response.json()["error"]
    response = http.post("/generate", json={"inputs": "Hello", "parameters": {"decoder_input_details": True}})
    assert response.status_code == 422 and "decoder_input_details" in response.json()["error"]
    assert server.idle()  # none of these reached the engine


def test_tgi_routes(server, http):
    whole = http.post("/generate", json={"inputs": "The capital of France is",
                                         "parameters": {"max_new_tokens": 6, "details": True}}).json()
    assert whole["details"]["generated_tokens"] == len(whole["details"]["tokens"]) <= 6
    events = []
    with http.stream("POST", "/generate_stream", json={"inputs": "The capital of France is",
                                                       "parameters": {"max_new_tokens": 6}}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                events.append(httpx.Response(200, content=line[5:]).json())
    assert "".join(e["token"]["text"] for e in events) == whole["generated_text"] == events[-1]["generated_text"]
    assert events[-1]["details"]["finish_reason"] in ("length", "eos_token")
    info = http.get("/info").json()
    assert info["max_total_tokens"] == 512 and info["max_input_tokens"] == 300
    tokens = http.post("/tokenize", json={"inputs": "Hello world"}).json()
    assert "".join(t["text"] for t in tokens) == "Hello world"


def test_past_the_concurrency_and_queue_limits_clients_get_429(server, http):
    async def one(client: httpx.AsyncClient) -> tuple[int, str | None, dict | None]:
        response = await client.post("/v1/completions", json={
            "prompt": "Count: 1, 2, 3,", "max_tokens": 24, "temperature": 0, "ignore_eos": True})
        return response.status_code, response.headers.get("retry-after"), response.json()

    peak = {"value": 0}

    async def watch(stop: asyncio.Event) -> None:
        while not stop.is_set():
            stats = server.engine.stats
            peak["value"] = max(peak["value"], stats.num_running + stats.num_waiting)
            await asyncio.sleep(0.005)

    async def main():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=300, limits=limits) as client:
            stop = asyncio.Event()
            watcher = asyncio.ensure_future(watch(stop))
            results = await asyncio.gather(*(one(client) for _ in range(64)))
            stop.set()
            await watcher
            return results

    results = asyncio.run(main())
    accepted = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(accepted) + len(refused) == 64 and refused and len(accepted) >= 32
    assert all(retry == "1" and body["error"]["type"] == "rate_limit_error" for _, retry, body in refused)
    assert all(body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 24
               for _, _, body in accepted)
    assert peak["value"] <= 16  # never more than max_concurrent_requests in the engine
    assert server.idle()


def test_clients_that_go_away_leave_nothing_behind(server, http):
    """20 streaming clients disconnect mid-stream, 10 non-streaming ones time out: every request is
    aborted and every KV block returns (seen through the engine and through /metrics)."""
    body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "ignore_eos": True}

    async def streaming(client: httpx.AsyncClient) -> int:
        seen = 0
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    seen += 1
                    if seen == 3:
                        break  # leaving the block closes the connection mid-stream
        return seen

    async def impatient(client: httpx.AsyncClient) -> str:
        try:
            await client.post("/v1/completions", json=body, timeout=1.5)
        except httpx.TimeoutException:
            return "timeout"
        return "finished"

    async def main():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=300,
                                     limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(streaming(client) for _ in range(20)),
                                        *(impatient(client) for _ in range(10)))

    results = asyncio.run(main())
    assert results[:20] == [3] * 20 and results[20:] == ["timeout"] * 10
    assert server.idle(timeout=30)
    deadline = time.monotonic() + 10
    while _metric(http, "tokenloom:num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(http, "tokenloom:num_requests_running") == 0
    assert _metric(http, "tokenloom:num_requests_waiting") == 0
    assert _metric(http, "tokenloom:kv_cache_usage_perc") == 0
    assert _metric(http, "tokenloom:kv_cache_free_blocks") == server.llm.engine.block_manager.num_blocks
    assert _metric(http, 'tokenloom:request_success_total{finished_reason="abort"}') >= 30
    usage = server.llm.memory_usage()
    assert _metric(http, "tokenloom:weights_bytes") == usage.weights > 0
    assert _metric(http, "tokenloom:kv_cache_bytes") == usage.kv_cache > 0
    assert _metric(http, "tokenloom:peak_memory_bytes") >= usage.weights  # the peak RSS holds the weights
    text = http.get("/metrics").text
    for name in ("tokenloom:time_to_first_token_seconds_bucket", "tokenloom:inter_token_latency_seconds_bucket",
                 "tokenloom:e2e_request_latency_seconds_bucket", "tokenloom:prompt_tokens_total",
                 "tokenloom:generation_tokens_total", "tokenloom:request_queue_time_seconds_bucket"):
        assert name in text
