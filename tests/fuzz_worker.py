"""Runs hostile-input cases one after another in a subprocess under a memory cap (`python -m
tests.fuzz_worker MEMORY_BYTES`): tokenloom is imported once, then each case (a JSON line on stdin)
is built if it is a recipe, loaded the way users load models, and answered with a JSON line on stdout.

Per case: AutoTokenizer.from_pretrained (encode, decode, apply the chat template when there is one), then
AutoModelForCausalLM.from_pretrained and one forward pass of a two-token input whose logits must be
finite. Each stage ends "ok", "typed" (a TokenloomError) or "untyped" (any other exception). The
parent process enforces the wall-clock limit and notices crashes.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any


def _limit_memory(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _stage(action: Any) -> dict[str, Any]:
    from tokenloom.errors import TokenloomError

    start = time.perf_counter()
    try:
        detail = action()
        outcome = {"outcome": "ok", "detail": detail}
    except TokenloomError as exc:
        outcome = {"outcome": "typed", "error": type(exc).__name__, "message": str(exc)[:300],
                   "hint": exc.hint}
    except BaseException as exc:  # noqa: BLE001 - every other exception is what the corpus looks for
        if isinstance(exc, KeyboardInterrupt):
            raise
        outcome = {"outcome": "untyped", "error": type(exc).__name__, "message": str(exc)[:300],
                   "traceback": traceback.format_exc()[-1500:]}
    outcome["seconds"] = round(time.perf_counter() - start, 3)
    return outcome


def _tokenizer_stage(path: str, gguf_file: str | None) -> dict[str, Any]:
    from tokenloom import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    ids = tokenizer("Hello world, 1 2 3")["input_ids"]
    text = tokenizer.decode(ids)
    rendered = None
    if tokenizer.chat_template is not None:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                                 tokenize=False)
        tokenizer(rendered, add_special_tokens=False)
    return {"ids": len(ids), "text": len(text), "template": None if rendered is None else len(rendered)}


def _model_stage(path: str, gguf_file: str | None) -> dict[str, Any]:
    import torch

    from tokenloom import AutoModelForCausalLM, EngineConfig

    model = AutoModelForCausalLM.from_pretrained(
        path, gguf_file=gguf_file, device_map="cpu", engine_config=EngineConfig(num_kv_blocks=4, max_num_seqs=2)
    )
    vocab = model.config.vocab_size
    ids = torch.tensor([[min(1, vocab - 1), min(2, vocab - 1)]])
    logits = model(ids).logits
    finite = bool(torch.isfinite(logits).all())
    return {"vocab": vocab, "finite": finite, "max_abs": float(logits.abs().max()) if finite else math.nan}


def materialize(case: dict[str, Any], workdir: Path, cache: dict[str, Any]) -> tuple[str, str]:
    """The path to load (building a recipe's file in `workdir`) and a description of the case."""
    from tests.fuzz_random import random_mutation
    from tests.hostile_files import encode_header, flipped, parse_raw, truncated, write_with_header

    recipe = case.get("recipe") or {}
    op = recipe.get("op")
    if op is None:
        return case["path"], ""
    src = Path(recipe["src"])
    out = workdir / f"case{src.suffix}"
    if op == "truncate":
        return str(truncated(src, out, recipe["length"])), f"truncated to {recipe['length']} bytes"
    if op == "flip":
        return str(flipped(src, out, [tuple(f) for f in recipe["flips"]])), f"flipped {recipe['flips']}"
    if op == "mutate":
        raw = cache.get(str(src))
        if raw is None:
            raw = cache[str(src)] = parse_raw(src)
        description, kvs = random_mutation(raw, recipe["seed"])
        return str(write_with_header(raw, out, encode_header(raw.version, kvs, raw.tensors))), description
    raise ValueError(f"unknown recipe {op!r}")


def run_case(case: dict[str, Any], cache: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tl-fuzz-") as tmp:
        try:
            path, description = materialize(case, Path(tmp), cache)
        except Exception as exc:  # noqa: BLE001
            return {"name": case["name"], "harness_error": f"{type(exc).__name__}: {exc}"}
        gguf_file = (case.get("recipe") or {}).get("gguf_file")
        tokenizer = _stage(lambda: _tokenizer_stage(path, gguf_file))
        model = _stage(lambda: _model_stage(path, gguf_file))
    return {"name": case["name"], "description": description, "tokenizer": tokenizer, "model": model}


def main() -> None:
    limit = int(sys.argv[1]) if len(sys.argv) > 1 else 4 << 30
    _limit_memory(limit)
    if os.environ.get("TOKENLOOM_FUZZ_SRC"):  # another tokenloom (the code before a fix), ahead of this one
        sys.path.insert(0, os.environ["TOKENLOOM_FUZZ_SRC"])
    os.environ.setdefault("TOKENLOOM_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    import tokenloom.compat.model  # noqa: F401  (import once, before the first case)
    import tokenloom.compat.tokenizer  # noqa: F401

    cache: dict[str, Any] = {}
    print(json.dumps({"ready": True, "tokenloom": tokenloom.__file__}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        case = json.loads(line)
        print(json.dumps(run_case(case, cache), default=str), flush=True)


if __name__ == "__main__":
    main()
