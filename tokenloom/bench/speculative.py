"""Speculative decoding bench (L6): single-stream greedy tok/s on an input-grounded task (edit a given
text) without and with prompt lookup, plus the acceptance rate and mean accepted length.

    python -m tokenloom.bench.speculative [--model M] [--new-tokens 128] [--k 5] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from tokenloom.config import DEFAULT_MODEL, EngineConfig
from tokenloom.sampling_params import SamplingParams
from tokenloom.speculative_config import SpeculativeConfig

TEXT = (
    "The old lighthouse stood at the edge of the cliff for more than a hundred years. Every night its keeper "
    "climbed the narrow stairs, lit the great lamp and watched the ships pass safely through the strait. "
    "When the keeper grew old, the town council decided to replace the lamp with an automatic light, but the "
    "fishermen asked that the keeper be allowed to stay in the cottage beside the tower for the rest of his life."
)
TASK = (
    "<|im_start|>user\nRepeat the following text exactly, but replace the word \"keeper\" with \"guardian\":\n\n"
    f"{TEXT}<|im_end|>\n<|im_start|>assistant\n"
)


def run(model: str, new_tokens: int, k: int, repeats: int, dtype: str | None = None) -> dict[str, Any]:
    from tokenloom.llm import LLM

    llm = LLM(model, dtype=dtype, engine_config=EngineConfig(max_num_seqs=1))
    return {"model": model, **measure_speculative(llm, new_tokens, k, repeats)}


def describe(results: dict[str, Any]) -> str:
    """One paragraph of `measure_speculative`'s figures, for `tokenloom bench --speculative`."""
    plain, lookup = results["plain"], results["prompt_lookup"]
    return (f"speculative decoding, prompt lookup (k={results['k']}) on an edit task ({results['prompt_tokens']}-token "
            f"prompt, {results['new_tokens']} new tokens, one stream): {lookup['tok_s']:.1f} tok/s vs "
            f"{plain['tok_s']:.1f} plain ({results['speed_up']:.2f}x); acceptance rate {lookup['acceptance_rate']}, "
            f"mean accepted length {lookup['mean_accepted_length']}; same tokens as plain: {results['same_tokens']}")


def measure_speculative(llm: Any, new_tokens: int, k: int, repeats: int) -> dict[str, Any]:
    """Best-of-`repeats` single-stream greedy tok/s on TASK without and with prompt lookup, for at most
    as many new tokens as the text to edit has (EOS is ignored, so past the edited copy the model would
    ramble on, which measures something else)."""
    prompt = llm.tokenizer.encode(TASK)
    new_tokens = min(new_tokens, len(llm.tokenizer.encode(TEXT)))
    results: dict[str, Any] = {"prompt_tokens": len(prompt), "new_tokens": new_tokens, "k": k}
    outputs = {}
    for name, spec in (("plain", None), ("prompt_lookup", SpeculativeConfig("prompt_lookup", k))):
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, speculative=spec)
        best = float("inf")
        before = llm.engine.speculative_stats.as_dict()
        for _ in range(repeats):
            start = time.perf_counter()
            (out,) = llm.generate([prompt], params)
            best = min(best, time.perf_counter() - start)
        after = llm.engine.speculative_stats
        outputs[name] = out.token_ids
        row: dict[str, Any] = {"seconds": round(best, 3), "tok_s": round(len(out.token_ids) / best, 2)}
        if spec is not None:
            proposed = after.num_proposed_tokens - int(before["num_proposed_tokens"] or 0)
            accepted = after.num_accepted_tokens - int(before["num_accepted_tokens"] or 0)
            rows = after.num_verified_rows - int(before["num_verified_rows"] or 0)
            row["acceptance_rate"] = round(accepted / proposed, 3) if proposed else None
            row["mean_accepted_length"] = round((accepted + rows) / rows, 3) if rows else None
        results[name] = row
    results["same_tokens"] = outputs["plain"] == outputs["prompt_lookup"]
    results["speed_up"] = round(results["plain"]["seconds"] / results["prompt_lookup"]["seconds"], 3)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", "-m", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default=None, help="float32 for the exact mode (default: the fast default)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=5, help="num_speculative_tokens")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    print(json.dumps(run(args.model, args.new_tokens, args.k, args.repeats, args.dtype), indent=2))


if __name__ == "__main__":
    main()
