"""The in-process engines of the bench: tokenloom (its default mode and the exact fp32 mode) and
transformers (fp32, bf16) on the same checkpoint."""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from typing import Any

from tokenloom.bench.common import CHAT_FIRST, CHAT_SECOND, Settings, decode_rate, expect, progress, timed


class TokenloomRunner:
    """tokenloom's offline LLM: one engine; concurrent prompts go in as one continuous batch.
    `dtype` None is the default mode (whatever LLM(...) picks), "float32" the exact mode."""

    def __init__(self, args: argparse.Namespace, s: Settings, name: str, dtype: str | None,
                 compile: bool = False) -> None:
        from tokenloom.config import EngineConfig
        from tokenloom.llm import LLM

        self.name = name
        progress(f"{name}: loading {args.model}")
        config = EngineConfig(max_num_seqs=max(64, s.concurrency), compile=compile)
        self.llm, self.load_s = timed(lambda: LLM(args.model, gguf_file=args.gguf_file, dtype=dtype,
                                                  engine_config=config))
        self.turn_tokens = s.new_tokens

    def _params(self, n: int) -> Any:
        return self.llm.sampling_params(temperature=0.0, max_tokens=n, ignore_eos=True)

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenizer.encode(text)

    def _stamps(self, prompt: str | list[int], n: int) -> list[float]:
        return [time.perf_counter() for out in self.llm.stream(prompt, self._params(n)) for _ in out.new_token_ids]

    def decode(self, prompt: str, n: int) -> float:
        return decode_rate(self._stamps(prompt, n), n, f"{self.name} decode")

    def long_decode(self, ids: list[int], n: int) -> float:
        return decode_rate(self._stamps(ids, n), n, f"{self.name} long-context decode")

    def batch(self, prompts: list[str], n: int) -> int:
        return sum(len(c.token_ids) for c in self.llm.generate(prompts, self._params(n)))

    def prefill(self, ids: list[int]) -> float:
        return timed(lambda: self._stamps(ids, 1))[1]

    @contextlib.contextmanager
    def _prefix_cache(self) -> Iterator[None]:
        """The prefix cache on (as `tokenloom chat` and `serve` run) for the phases that measure a
        follow-up; the other phases measure cold prompts."""
        blocks = self.llm.engine.block_manager
        self.llm.reset_prefix_cache()  # nothing from an earlier round
        blocks.enable_prefix_caching = True
        try:
            yield
        finally:
            blocks.enable_prefix_caching = False

    def prefix_turns(self, prefix_ids: list[int], n: int) -> tuple[float, float, float]:
        """Seconds to the first token of two questions on one document (`prefix_ids`), the second asked
        after the first's answer, with the prefix cache on: the second computes only its new tokens.
        Also the share of the second prompt's tokens the cache supplied."""
        with self._prefix_cache():
            turn1 = prefix_ids + self.encode(f"\nQuestion: {CHAT_FIRST}\nAnswer:")
            start = time.perf_counter()
            stamps, answer = [], []
            for out in self.llm.stream(turn1, self._params(n)):
                stamps.extend(time.perf_counter() for _ in out.new_token_ids)
                answer.extend(out.new_token_ids)
            turn2 = turn1 + answer + self.encode(f"\nQuestion: {CHAT_SECOND}\nAnswer:")
            first = stamps[0] - start
            start = time.perf_counter()
            outs = list(self.llm.stream(turn2, self._params(1)))
            second = time.perf_counter() - start
            cached = outs[-1].metrics.num_cached_tokens / len(turn2)
        return first, second, cached

    def turn2_ttft(self) -> float:
        """Seconds to the first token of a chat's second turn (the first turn generated before), with
        the prefix cache on as in `tokenloom chat`: the first turn's blocks are reused where the
        re-rendered conversation's tokens still match them."""
        with self._prefix_cache():
            messages = [{"role": "user", "content": CHAT_FIRST}]
            first = self.llm.generate([self.llm.chat_prompt(messages)], self._params(self.turn_tokens))[0]
            messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": CHAT_SECOND}]
            ids = self.llm.chat_prompt(messages)
            start = time.perf_counter()
            stamps = self._stamps(ids, 1)
        return stamps[0] - start


class _StampStreamer:
    """A transformers streamer that only records when each put() happens: the first put is the
    prompt (before prefill), every later one a new token."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: Any) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


class TransformersRunner:
    """transformers' own model from the same checkpoint; a batch is one left-padded generate call."""

    def __init__(self, transformers: Any, source: Any, device: Any, name: str, dtype_name: str,
                 s: Settings) -> None:
        import torch

        self.name, self.device, self.torch = name, device, torch
        where = str(source.path.parent if source.kind == "gguf" else source.path)
        extra = {"gguf_file": source.path.name} if source.kind == "gguf" else {}

        def load() -> tuple[Any, Any]:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                where, dtype=getattr(torch, dtype_name), **extra
            ).to(device).eval()
            return model, transformers.AutoTokenizer.from_pretrained(where, padding_side="left", **extra)

        progress(f"{name}: loading")
        (self.model, self.tokenizer), self.load_s = timed(load)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.turn_tokens = s.new_tokens

    def _generate(self, inputs: dict[str, Any], n: int, **kw: Any) -> Any:
        with self.torch.inference_mode():
            return self.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                       pad_token_id=self.tokenizer.pad_token_id, **kw)

    def _encode(self, prompts: list[str]) -> dict[str, Any]:
        return dict(self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device))

    def _ids(self, ids: list[int]) -> dict[str, Any]:
        tensor = self.torch.tensor([ids], device=self.device)
        return {"input_ids": tensor, "attention_mask": self.torch.ones_like(tensor)}

    def decode(self, prompt: str, n: int) -> float:
        streamer = _StampStreamer()
        self._generate(self._encode([prompt]), n, streamer=streamer)
        return decode_rate(streamer.stamps[1:], n, f"{self.name} decode")

    def long_decode(self, ids: list[int], n: int) -> float:
        streamer = _StampStreamer()
        self._generate(self._ids(ids), n, streamer=streamer)
        return decode_rate(streamer.stamps[1:], n, f"{self.name} long-context decode")

    def batch(self, prompts: list[str], n: int) -> int:
        inputs = self._encode(prompts)
        out = self._generate(inputs, n)
        total = (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]
        expect(total, len(prompts) * n, f"{self.name} batch")
        return total

    def prefill(self, ids: list[int]) -> float:
        return timed(lambda: self._generate(self._ids(ids), 1))[1]

    def turn2_ttft(self) -> float:
        messages = [{"role": "user", "content": CHAT_FIRST}]
        template = {"add_generation_prompt": True, "return_dict": True, "return_tensors": "pt"}
        inputs = dict(self.tokenizer.apply_chat_template(messages, **template).to(self.device))
        out = self._generate(inputs, self.turn_tokens)
        reply = self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": CHAT_SECOND}]
        inputs = dict(self.tokenizer.apply_chat_template(messages, **template).to(self.device))
        streamer = _StampStreamer()
        start = time.perf_counter()
        self._generate(inputs, 1, streamer=streamer)
        return streamer.stamps[1] - start
