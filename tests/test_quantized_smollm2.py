"""The fast weight formats on the real SmolLM2 against the exact mode (float32, dequantized as
transformers does; the parity tests tie it to transformers): greedy 32-token continuations of the 20
fixed prompts, and the perplexity of a fixed 1,000-token text, computed in both modes.

Decoding runs 8 sequences at a time: the quantized kernels in every mode (the output projection is
dense in all). The default mode runs calls of more than 16 rows (prefills) on an exact float32 copy,
so its perplexity is the exact mode's, and 15 of the 20 continuations must match (the issue's bar).
"kernels only", load_in_8bit and load_in_4bit keep no copy: their prefills go through the kernels
too, whose bfloat16 outputs perturb the prompt's keys and values. Their bar is the bfloat16 dense
mode's count, measured here: they round a subset of what it rounds (kernel inputs, outputs and
scales), so they must be at least as faithful. (Measured: default 15, kernels only 14, load_in_8bit
14, load_in_4bit 13, bfloat16 dense 12.)
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
from tokenloom.models.linear import Int4Linear
from tokenloom.tokenizer import Tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

NEW_TOKENS = 32
TEXT_TOKENS = 1000
TEXT = Path(__file__).parent / "data" / "perplexity_text.md"
# mode: (load_model arguments, format of the MLP, perplexity tolerance, greedy bar: a count or "bf16")
MODES = {
    "default": ({}, Int4Linear, 0.03, 15),
    "kernels only": ({"kernels": KernelPolicy(dense_dtype=None)}, Int4Linear, 0.03, "bf16"),
    "load_in_8bit": ({"quantize_bits": 8}, Int4Linear, 0.01, "bf16"),  # 8 bits in groups: two 4-bit pieces
    "load_in_4bit": ({"quantize_bits": 4}, Int4Linear, 0.03, "bf16"),
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


@pytest.fixture(scope="module")
def bf16_same(smollm2_gguf, exact, prompts) -> int:
    """How many greedy continuations the bfloat16 dense mode shares with the exact mode."""
    greedy = engine_greedy(_engine(load_model(smollm2_gguf, dtype="bfloat16")), prompts, NEW_TOKENS)
    return sum(g == e for g, e in zip(greedy, exact[0]))


@pytest.mark.parametrize("mode", MODES)
def test_fast_formats_stay_close_to_the_exact_mode(mode, smollm2_gguf, exact, prompts, text_ids, request) -> None:
    kwargs, module_type, tolerance, bar = MODES[mode]
    loaded = load_model(smollm2_gguf, **kwargs)
    assert isinstance(loaded.model.model.layers[0].mlp.gate_up_proj, module_type)
    engine = _engine(loaded)
    exact_greedy, exact_perplexity = exact
    greedy = engine_greedy(engine, prompts, NEW_TOKENS)
    same = sum(g == e for g, e in zip(greedy, exact_greedy))
    perplexity = _perplexity(engine, text_ids)
    print(f"{mode}: {same}/20 greedy continuations equal; perplexity {perplexity:.4f} vs {exact_perplexity:.4f}")
    needed = request.getfixturevalue("bf16_same") if bar == "bf16" else bar
    assert same >= needed, f"{mode}: only {same}/20 greedy continuations equal the exact mode's (need {needed})"
    assert abs(perplexity / exact_perplexity - 1) <= tolerance, (mode, perplexity, exact_perplexity)
