"""The fast weight formats on the real SmolLM2 against the exact mode (float32, dequantized as
transformers does; the parity tests tie it to transformers): greedy 32-token continuations of the 20
fixed prompts, and the perplexity of a fixed 1,000-token text, computed in both modes.

Decoding runs 8 sequences at a time: the quantized kernels in every mode. The 1,000-row prefill that
scores the text takes the default mode's dense bfloat16 copy (on a CPU with AVX512_BF16 or AMX);
"kernels only" keeps no copy and sends it through the int4 kernel too.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.prompts import GREEDY_PROMPTS
from tests.tiny_models import engine_greedy
from tokenloom.config import EngineConfig
from tokenloom.engine.engine import Engine
from tokenloom.kernels.policy import KernelPolicy
from tokenloom.loading import load_model
from tokenloom.models.linear import Int4Linear, Int8Linear
from tokenloom.tokenizer import Tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

NEW_TOKENS = 32
TEXT_TOKENS = 1000
TEXT = Path(__file__).parent / "data" / "perplexity_text.md"
MODES = {
    "default": ({}, Int4Linear, 0.03),
    "kernels only": ({"kernels": KernelPolicy(dense_dtype=None)}, Int4Linear, 0.03),
    "load_in_8bit": ({"quantize_bits": 8}, Int8Linear, 0.01),
    "load_in_4bit": ({"quantize_bits": 4}, Int4Linear, 0.03),
}


def _engine(loaded) -> Engine:
    return Engine(loaded.model, EngineConfig(max_num_seqs=8, max_num_batched_tokens=2048))


def _perplexity(engine: Engine, ids: list[int]) -> float:
    logits = engine.prompt_logits([ids])[0].float()  # [len, vocab], one prefill
    log_probs = torch.log_softmax(logits[:-1], dim=-1)
    nll = -log_probs.gather(1, torch.tensor(ids[1:])[:, None]).mean().item()
    return math.exp(nll)


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf) -> Tokenizer:
    from tokenloom.loading.checkpoint import ModelSource

    return Tokenizer.from_source(ModelSource(kind="gguf", path=smollm2_gguf))


@pytest.fixture(scope="module")
def text_ids(tokenizer) -> list[int]:
    ids = tokenizer.encode(TEXT.read_text(encoding="utf-8"))
    assert len(ids) >= TEXT_TOKENS
    return ids[:TEXT_TOKENS]


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(p) for p in GREEDY_PROMPTS]


@pytest.fixture(scope="module")
def exact(smollm2_gguf, prompts, text_ids) -> tuple[list[list[int]], float]:
    engine = _engine(load_model(smollm2_gguf, dtype="float32"))
    return engine_greedy(engine, prompts, NEW_TOKENS), _perplexity(engine, text_ids)


@pytest.mark.parametrize("mode", MODES)
def test_fast_formats_stay_close_to_the_exact_mode(mode, smollm2_gguf, exact, prompts, text_ids) -> None:
    kwargs, module_type, tolerance = MODES[mode]
    loaded = load_model(smollm2_gguf, **kwargs)
    assert isinstance(loaded.model.model.layers[0].mlp.gate_up_proj, module_type)
    engine = _engine(loaded)
    exact_greedy, exact_perplexity = exact
    greedy = engine_greedy(engine, prompts, NEW_TOKENS)
    same = sum(g == e for g, e in zip(greedy, exact_greedy))
    perplexity = _perplexity(engine, text_ids)
    print(f"{mode}: {same}/20 greedy continuations equal; perplexity {perplexity:.4f} vs {exact_perplexity:.4f}")
    assert same >= 15, f"{mode}: only {same}/20 greedy continuations equal the exact mode's"
    assert abs(perplexity / exact_perplexity - 1) <= tolerance, (mode, perplexity, exact_perplexity)
