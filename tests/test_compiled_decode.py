"""The compiled decode step (EngineConfig.compile) against the eager path on the same model: the same
greedy tokens for 20 prompts of mixed lengths, batched and under preemption, with the batch-size
buckets of 1, 3, 17 and 33 rows exercised; a sliding-window architecture too. Chunked prefill gives
the logits of a single prefill. The KV budget sizes the pool."""

from __future__ import annotations

import random

import pytest
import torch

from tokenloom.config import EngineConfig
from tokenloom.engine.compiled_decode import batch_buckets, can_compile
from tokenloom.engine.engine import Engine
from tokenloom.engine.memory import kv_budget_bytes
from tokenloom.engine.scheduler import ScheduledSequence, SchedulerOutput
from tokenloom.engine.sequence import Sequence
from tokenloom.models.llama import LlamaConfig, LlamaForCausalLM
from tokenloom.sampling_params import SamplingParams

from .tiny_models import engine_greedy

needs_compiler = pytest.mark.skipif(not can_compile(torch.device("cpu")), reason="inductor needs a C++ compiler")

VOCAB = 97


def _tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    values = dict(
        model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
        rms_norm_eps=1e-5,
    )
    values.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**values)).eval()
    with torch.no_grad():  # the layers are never initialised (loading fills them): random weights here,
        for name, param in model.named_parameters():  # nn.Linear's scale, and norms away from 1
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            else:
                bound = param.shape[-1] ** -0.5
                param.uniform_(-bound, bound)
    return model


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 40))] for _ in range(count)]


@pytest.fixture(scope="module")
def model():
    return _tiny_llama()


@pytest.fixture(scope="module")
def compiled_engine(model):
    """One compiling engine for the module: every bucket is compiled once and reused."""
    return Engine(model, EngineConfig(block_size=4, compile=True))


def test_buckets_cover_every_batch_size():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(1) == [1]


@needs_compiler
def test_compiled_matches_eager_on_20_prompts_of_mixed_lengths(model, compiled_engine):
    prompts = _prompts(20)
    eager = Engine(model, EngineConfig(block_size=4))
    assert eager.runner.compiled is None
    expected = engine_greedy(eager, prompts, 24)
    # alone (one row), then all together: every step a batch of different context lengths
    assert [engine_greedy(compiled_engine, [p], 24)[0] for p in prompts[:3]] == expected[:3]
    assert engine_greedy(compiled_engine, prompts, 24) == expected
    compiled = compiled_engine.runner.compiled
    assert compiled is not None and not compiled._failed
    assert {1, 24} <= set(compiled.compile_seconds)  # the 1-row and the 20-row (padded to 24) graphs ran


@needs_compiler
@pytest.mark.parametrize("rows", [1, 3, 17, 33])
def test_batch_size_buckets(model, compiled_engine, rows):
    prompts = _prompts(rows, seed=rows)
    expected = engine_greedy(Engine(model, EngineConfig(block_size=4)), prompts, 6)
    assert engine_greedy(compiled_engine, prompts, 6) == expected
    compiled = compiled_engine.runner.compiled
    assert compiled.bucket_for(rows) in compiled.compile_seconds and not compiled._failed


@needs_compiler
def test_compiled_matches_eager_under_preemption(model):
    prompts = _prompts(20, seed=1)
    small = dict(block_size=2, num_kv_blocks=90)
    expected = engine_greedy(Engine(model, EngineConfig(**small)), prompts, 20)
    engine = Engine(model, EngineConfig(**small, compile=True))
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    preempted, done = 0, {}
    while engine.has_unfinished():  # by hand, to count preemptions (as run_counting_preemptions)
        out = engine.scheduler.schedule()
        preempted += len(out.preempted)
        result = engine.runner.step(out)
        for seq in engine.scheduler.update(out, result.sampled_token_ids):
            if seq.is_finished:
                done[seq.request_id] = seq.output_token_ids
                engine._release(seq)
    assert preempted > 0
    assert [done[i] for i in ids] == expected
    assert not engine.runner.compiled._failed and engine.runner.compiled.compile_seconds


@needs_compiler
def test_lazy_compilation_waits_for_enough_decode_steps(model):
    engine = Engine(model, EngineConfig(block_size=4, compile=None, compile_after=5))
    prompts = _prompts(2, seed=3)
    expected = engine_greedy(Engine(model, EngineConfig(block_size=4)), prompts, 4)
    assert engine_greedy(engine, prompts, 4) == expected  # 3 decode steps: nothing compiled yet
    assert engine.runner.compiled.compile_seconds == {}
    assert engine.runner.num_decode_steps == 3
    engine_greedy(engine, prompts, 6)
    assert engine.runner.compiled.compile_seconds  # steps past the fifth ran compiled


@needs_compiler
def test_sliding_window_model_compiled_matches_eager():
    # Mistral-style: every layer attends its last 6 positions, so each step reads only the last blocks
    model = _tiny_llama(seed=2, model_type="mistral", sliding_window=6)
    prompts = _prompts(5, seed=2)
    expected = engine_greedy(Engine(model, EngineConfig(block_size=4)), prompts, 16)
    engine = Engine(model, EngineConfig(block_size=4, compile=True))
    assert engine_greedy(engine, prompts, 16) == expected
    assert not engine.runner.compiled._failed


def test_eager_engine_never_builds_a_compiler(model):
    assert Engine(model, EngineConfig(compile=False)).runner.compiled is None


def _chunked_logits(engine: Engine, prompt: list[int], chunk: int) -> torch.Tensor:
    seq = Sequence("chunked", prompt, SamplingParams(), 0)
    engine.block_manager.allocate(seq, len(prompt))
    parts = []
    try:
        for start in range(0, len(prompt), chunk):
            size = min(chunk, len(prompt) - start)
            parts.extend(engine.runner.all_logits(SchedulerOutput(scheduled=[ScheduledSequence(seq, size)])))
            seq.num_computed_tokens += size
    finally:
        engine.block_manager.free(seq)
    return torch.cat(parts)


@pytest.mark.parametrize("chunk", [1, 3, 7, 16])
def test_chunked_prefill_gives_the_logits_of_a_single_prefill(model, chunk):
    engine = Engine(model, EngineConfig(block_size=4))
    prompt = _prompts(1, seed=5)[0] * 3  # 30+ tokens: chunks cross block boundaries
    single = engine.prompt_logits([prompt])[0]  # [len, vocab], one step
    chunked = _chunked_logits(engine, prompt, chunk)
    assert chunked.shape == single.shape
    assert (chunked - single).abs().max().item() <= 1e-4


def test_kv_budget_in_bytes_and_as_a_fraction(model):
    mc = model.config
    per_block = 2 * mc.num_hidden_layers * 4 * mc.num_key_value_heads * mc.head_dim * 4  # fp32, block of 4
    engine = Engine(model, EngineConfig(block_size=4, kv_cache_memory=per_block * 10 + 1))
    assert engine.kv_cache.num_blocks == engine.block_manager.num_blocks == 10
    usage = engine.memory_usage()
    assert usage.num_kv_blocks == 10 and usage.kv_cache == per_block * 11  # + the scratch block
    assert usage.peak > 0 and usage.weights == sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    # a fraction of what is free, never more than the pool could use
    assert kv_budget_bytes(0.5, torch.device("cpu")) > 0
    capped = Engine(model, EngineConfig(block_size=4, kv_cache_memory=0.5, max_num_seqs=2))
    assert capped.kv_cache.num_blocks == 2 * -(-mc.max_position_embeddings // 4)


@pytest.mark.parametrize("bad", [0, -5, 1.5, 0.0, True, "1GB"])
def test_kv_budget_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="kv_cache_memory"):
        EngineConfig(kv_cache_memory=bad)
