"""`tokenloom bench --structured`: decode throughput of concurrent JSON-schema requests next to the same
number of unconstrained ones (L6), i.e. what the grammar mask costs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from tokenloom.sampling_params import SamplingParams

# An array of records; `measure_structured` asks for more items than fit in its token budget (each takes
# several tokens), so no request completes early and every one decodes its full length, as the
# unconstrained ones do with ignore_eos (requests that closed the array early left a narrower batch).
BENCH_SCHEMA: dict[str, Any] = {"type": "array", "items": {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 9999}, "tag": {"enum": ["alpha", "beta", "gamma"]},
    "name": {"type": "string", "maxLength": 12}}, "required": ["id", "tag", "name"], "additionalProperties": False}}


@dataclass
class StructuredResult:
    concurrency: int
    new_tokens: int
    free_tok_s: float
    json_tok_s: float

    @property
    def mask_cost(self) -> float:
        """The fraction of throughput the grammar mask costs."""
        return 1.0 - self.json_tok_s / self.free_tok_s

    def describe(self) -> str:
        return (f"structured output: {self.concurrency} concurrent x {self.new_tokens} tokens: JSON schema "
                f"{self.json_tok_s:.1f} tok/s vs unconstrained {self.free_tok_s:.1f} tok/s "
                f"(the mask costs {100 * self.mask_cost:.1f}%)")


def _tok_s(llm: Any, prompt: list[int], params: list[SamplingParams]) -> float:
    started = time.perf_counter()
    results = llm.generate([prompt] * len(params), params)
    elapsed = time.perf_counter() - started
    return sum(len(r.token_ids) for r in results) / elapsed


def measure_structured(llm: Any, concurrency: int, new_tokens: int, repeats: int = 1) -> StructuredResult:
    """Best-of-`repeats` tok/s of `concurrency` JSON-schema requests and of as many unconstrained ones,
    sampled at temperature 1 with per-request seeds, `new_tokens` each, alternating phase by phase."""
    prompt = llm.chat_prompt([{"role": "user", "content": "List some records as JSON."}])
    free = [SamplingParams(temperature=1.0, seed=i, max_tokens=new_tokens, ignore_eos=True) for i in range(concurrency)]
    schema = {**BENCH_SCHEMA, "minItems": new_tokens}
    constrained = [SamplingParams(temperature=1.0, seed=i, max_tokens=new_tokens, json_schema=schema)
                   for i in range(concurrency)]
    _tok_s(llm, prompt, free[:2])  # warm-up
    best_free = best_json = 0.0
    for _ in range(max(1, repeats)):
        best_free = max(best_free, _tok_s(llm, prompt, free))
        best_json = max(best_json, _tok_s(llm, prompt, constrained))
    return StructuredResult(concurrency, new_tokens, best_free, best_json)
