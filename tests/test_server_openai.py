"""The official openai client against `tokenloom serve` on the real SmolLM2 (one server per module)."""

from __future__ import annotations

import asyncio

import pytest

from tests.serving_helpers import start_server
from tokenloom.sampling_params import SamplingParams

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "Name three colors."}]
PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time", "def add(a, b):",
           "The best fruit is", "Water boils at", "My favourite animal is", "Hello, my name is"]


@pytest.fixture(scope="module")
def server(one_torch_thread):
    from tokenloom import LLM
    from tokenloom.config import EngineConfig

    # exact mode: a row's tokens do not depend on its batch (nor on a prefix-cache hit); the prefix
    # cache is on, as `tokenloom serve` has it
    llm = LLM("smollm2-135m-instruct", dtype="float32", engine_config=EngineConfig(enable_prefix_caching=True))
    running = start_server(llm)
    yield running
    running.stop()
    llm.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _alone(server, prompt_ids: list[int], max_tokens: int) -> tuple[str, list[int], str]:
    """The same greedy request computed by the library face (the reference): text, tokens and the
    finish reason as OpenAI names it."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    (completion,) = server.llm.generate([prompt_ids], params)
    return completion.text, completion.token_ids, {"eos": "stop"}.get(completion.finish_reason, completion.finish_reason)


def test_chat_non_streamed_and_streamed_agree_and_usage_is_right(server, client):
    reply = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=12, temperature=0)
    prompt_ids = server.llm.chat_prompt(CHAT)
    text, tokens, finish = _alone(server, prompt_ids, 12)
    assert reply.object == "chat.completion" and reply.model == "smollm2" and reply.id.startswith("chatcmpl")
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == finish
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == len(tokens)
    assert reply.usage.total_tokens == len(prompt_ids) + len(tokens)

    chunks = list(client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text and len([p for p in pieces if p]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)


def test_a_shared_system_prompt_is_served_from_the_prefix_cache(server, client):
    import httpx

    system = {"role": "system", "content": "You answer in French, briefly, and never use lists. " * 4}
    first = client.chat.completions.create(model="smollm2", messages=[system, {"role": "user", "content": "Hi"}],
                                           max_tokens=4, temperature=0)
    messages = [system, {"role": "user", "content": "Name a fruit."}]
    second = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8, temperature=0)
    shared = len(server.llm.tokenizer.encode(system["content"])) // 16 * 16
    assert first.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens_details.cached_tokens
    assert second.usage.prompt_tokens_details.cached_tokens >= shared
    text, _, _ = _alone(server, server.llm.chat_prompt(messages), 8)
    assert second.choices[0].message.content == text
    metrics = httpx.get(server.url + "/metrics").text
    hits = [line for line in metrics.splitlines() if line.startswith("tokenloom:prefix_cache_hits ")]
    assert hits and float(hits[0].split()[1]) >= shared
    assert "tokenloom:prefix_cache_hit_rate" in metrics


def test_completions_sync_and_async_streaming_and_not(server, client):
    prompt = PROMPTS[0]
    text, tokens, _ = _alone(server, server.llm.tokenizer.encode(prompt), 8)
    result = client.completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0, echo=False)
    assert result.object == "text_completion" and result.choices[0].text == text
    assert result.usage.completion_tokens == len(tokens) and result.usage.prompt_tokens == len(server.llm.tokenizer.encode(prompt))

    async def main() -> tuple[str, str]:
        async_client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        whole = await async_client.completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0)
        stream = await async_client.completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0,
                                                       stream=True)
        streamed = "".join([c.choices[0].text async for c in stream])
        chat = await async_client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=6, temperature=0)
        assert chat.choices[0].message.content
        await async_client.close()
        return whole.choices[0].text, streamed

    whole, streamed = asyncio.run(main())
    assert whole == streamed == text
    echoed = client.completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + text


def test_logprobs_n_stop_and_seed(server, client):
    reply = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                           top_logprobs=2)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in entries)
    assert all(e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in entries)
    assert "".join(e.token for e in entries) == reply.choices[0].message.content
    legacy = client.completions.create(model="smollm2", prompt=PROMPTS[1], max_tokens=4, temperature=0, logprobs=1)
    assert len(legacy.choices[0].logprobs.token_logprobs) == 4
    samples = client.completions.create(model="smollm2", prompt=PROMPTS[2], max_tokens=6, temperature=1.0, n=3, seed=7)
    again = client.completions.create(model="smollm2", prompt=PROMPTS[2], max_tokens=6, temperature=1.0, n=3, seed=7)
    assert [c.index for c in samples.choices] == [0, 1, 2]
    assert [c.text for c in samples.choices] == [c.text for c in again.choices]  # seeded: repeatable
    assert samples.usage.completion_tokens <= 18 and len({c.text for c in samples.choices}) > 1
    stopped = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"])
    assert stopped.choices[0].finish_reason == "stop" and " 7" not in stopped.choices[0].text
    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2"]


def test_32_concurrent_streams_equal_each_request_alone(server):
    alone = {p: _alone(server, server.llm.tokenizer.encode(p), 8)[0] for p in PROMPTS}

    async def one(async_client, prompt: str) -> str:
        stream = await async_client.completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0,
                                                       stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def main() -> list[str]:
        async_client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*(one(async_client, PROMPTS[i % len(PROMPTS)]) for i in range(32)))
        finally:
            await async_client.close()

    results = asyncio.run(main())
    assert results == [alone[PROMPTS[i % len(PROMPTS)]] for i in range(32)]
    assert server.idle()
