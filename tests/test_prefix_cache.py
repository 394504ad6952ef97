"""The automatic prefix cache through the engine, on a tiny random Llama (float32): a cache hit gives
the tokens and (within 1e-5) the logits of a cold run; a 40-turn chat computes only each new turn;
a tight pool evicts and still gives the cold outputs; beams share cached prompts; every-layer sliding
windows; and 200 random request mixes (shared system prompts, follow-ups, aborts, beam forks,
preemption) each leave the pool fully free with every reference count at zero."""

from __future__ import annotations

import random

import pytest
import torch

from tests.tiny_models import reference_greedy, run_counting_preemptions, write_tiny_gguf
from tokenloom.config import EngineConfig
from tokenloom.engine.beam_search import BeamSearchParams, beam_search
from tokenloom.engine.engine import Engine
from tokenloom.loading import load_model
from tokenloom.sampling_params import SamplingParams

BS = 4
SYSTEM = [5, 17, 33, 2, 41, 8, 60, 12, 9, 71, 30, 22, 3, 14]  # 14 tokens: three full blocks and a half


def _greedy(max_tokens: int = 6, **extra) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **extra)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("prefix"), "llama")
    return load_model(path, dtype="float32").model


def _engine(model, cache: bool = True, **config) -> Engine:
    config.setdefault("num_kv_blocks", 256)
    return Engine(model, EngineConfig(block_size=BS, enable_prefix_caching=cache, **config))


def _run(engine: Engine, requests: list[tuple[list[int], SamplingParams]]) -> list:
    ids = engine.add_requests(requests, detokenize=False)
    done = {o.request_id: o for o in engine.run() if o.finished}
    return [done[i] for i in ids]


def _assert_pool_free(engine: Engine) -> None:
    manager = engine.block_manager
    manager.check_consistency()
    assert manager.num_free_blocks == manager.num_blocks
    assert all(manager.ref_count(b) == 0 for b in range(manager.num_blocks))


def test_cache_hits_give_the_cold_tokens_and_logits(model) -> None:
    prompts = [SYSTEM + [i, i + 1, i + 2] for i in (40, 50, 60)]
    params = _greedy(output_logits=True)
    cold = _run(_engine(model, cache=False), [(p, params) for p in prompts])
    engine = _engine(model)
    first = _run(engine, [(prompts[0], params)])  # fills the cache with SYSTEM's blocks
    warm = _run(engine, [(p, params) for p in prompts])
    assert first[0].metrics.num_cached_tokens == 0
    assert [o.metrics.num_cached_tokens for o in warm] == [16, 12, 12]  # all of prompt 0's full blocks
    for c, w in zip(cold, warm):
        assert w.token_ids == c.token_ids
        for a, b in zip(c.logits, w.logits):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    stats = engine.block_manager.prefix_cache_stats
    assert stats.queries == 17 + 3 * 17 and stats.hits == 40
    _assert_pool_free(engine)


def test_a_forty_turn_chat_computes_only_each_new_turn(model) -> None:
    rng = random.Random(7)
    engine, cold = _engine(model), _engine(model, cache=False)
    history = list(SYSTEM)
    for turn in range(40):
        new = [rng.randrange(3, 90) for _ in range(rng.randint(2, 4))]  # the tiny model's context is 256
        prompt = history + new
        (out,) = _run(engine, [(prompt, _greedy(rng.randint(1, 3)))])
        computed = len(prompt) - out.metrics.num_cached_tokens
        if turn:
            # only the last answer's final token (never computed) and the new turn: the earlier
            # turns' full blocks and the last one's partial block (a tail) come from the cache
            assert computed == len(new) + 1, (turn, computed, len(new))
        if turn % 8 == 0:
            (ref,) = _run(cold, [(prompt, _greedy(len(out.token_ids)))])
            assert out.token_ids == ref.token_ids
        history = prompt + out.token_ids
    assert len(history) > 150
    _assert_pool_free(engine)


def test_a_tight_pool_evicts_and_still_gives_the_cold_outputs(model) -> None:
    rng = random.Random(3)
    systems = [SYSTEM, [rng.randrange(3, 90) for _ in range(11)], [rng.randrange(3, 90) for _ in range(19)]]
    requests = [(rng.choice(systems) + [rng.randrange(3, 90) for _ in range(rng.randint(1, 5))], _greedy(5))
                for _ in range(24)]
    cold = _run(_engine(model, cache=False), requests)
    engine = _engine(model, num_kv_blocks=14, max_num_seqs=2)
    warm = []
    for start in range(0, len(requests), 3):  # a few at a time, so later ones find cached prefixes
        warm.extend(_run(engine, requests[start : start + 3]))
    assert [o.token_ids for o in warm] == [o.token_ids for o in cold]
    stats = engine.block_manager.prefix_cache_stats
    assert stats.hits > 0 and stats.evictions > 0
    _assert_pool_free(engine)


def test_preempted_requests_resume_from_their_cached_blocks(model) -> None:
    requests = [(SYSTEM + [i] * 6, _greedy(24)) for i in range(3, 9)]
    cold = _run(_engine(model, cache=False, num_kv_blocks=40), requests)
    engine = _engine(model, num_kv_blocks=20)
    ids = engine.add_requests(requests, detokenize=False)
    assert run_counting_preemptions(engine) > 0
    seqs = [engine._sequences.get(i) for i in ids]
    assert all(s is None for s in seqs)  # released
    assert engine.block_manager.prefix_cache_stats.hits > 0
    _assert_pool_free(engine)
    again = _run(engine, requests)
    assert [o.token_ids for o in again] == [o.token_ids for o in cold]


def test_beams_start_from_a_cached_prompt_and_share_it(model) -> None:
    params = BeamSearchParams(num_beams=3, max_tokens=6, num_return_sequences=2)
    prompt = SYSTEM + [44, 45]
    cold = beam_search(_engine(model, cache=False), [prompt], params)
    engine = _engine(model)
    _run(engine, [(prompt, _greedy(2))])
    before = engine.block_manager.prefix_cache_stats.hits
    warm = beam_search(engine, [prompt], params)
    assert engine.block_manager.prefix_cache_stats.hits - before == 12
    assert [h.token_ids for h in warm[0]] == [h.token_ids for h in cold[0]]
    for a, b in zip(warm[0], cold[0]):
        assert a.score == pytest.approx(b.score, abs=1e-5)
    _assert_pool_free(engine)


def test_a_beam_search_that_fails_mid_step_leaves_only_computed_blocks(model, monkeypatch) -> None:
    """A step may point a beam at a copy-on-write block before its copy runs: when the search fails
    there, the beams still running are freed as never computed, so no uncopied block stays in the
    cache. Every prefix the failed search left is then continued warm and cold: the same tokens, and
    logits to rounding (the beams' own tokens were computed one step at a time, a cold prompt in one
    call: about 4e-4 apart on this model; an uncopied block would be garbage)."""
    engine = _engine(model)
    runner, manager, calls, freed = engine.runner, engine.block_manager, [], []
    real_step, real_free = runner.beam_step, manager.free

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # after the second step's forks and copy-on-write, before their copies
            raise RuntimeError("injected")
        return real_step(*args, **kwargs)

    def recording_free(seq):
        freed.append(list(seq.token_ids[: seq.num_computed_tokens]))
        real_free(seq)

    monkeypatch.setattr(runner, "beam_step", failing_step)
    monkeypatch.setattr(manager, "free", recording_free)
    with pytest.raises(RuntimeError, match="injected"):
        beam_search(engine, [SYSTEM + [44, 45]], BeamSearchParams(num_beams=3, max_tokens=6))
    monkeypatch.undo()
    _assert_pool_free(engine)
    prompts = [tokens + [9] for tokens in freed if len(tokens) > len(SYSTEM)]
    assert prompts
    params = _greedy(3, output_logits=True)
    cold = _run(_engine(model, cache=False), [(p, params) for p in prompts])
    for prompt, ref in zip(prompts, cold):
        (warm,) = _run(engine, [(prompt, params)])
        assert warm.token_ids == ref.token_ids
        for a, b in zip(ref.logits, warm.logits):
            torch.testing.assert_close(b, a, atol=1e-2, rtol=0)


def test_every_layer_sliding_window(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2,
        max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        num_hidden_layers=2, sliding_window=8, tie_word_embeddings=False,
    )
    ref = transformers.MistralForCausalLM(config).eval()
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="float32").model
    engine = _engine(model, num_kv_blocks=24)
    assert engine.model.config.kv_window == 8
    prompts = [SYSTEM + [i, i + 3] for i in (10, 20, 30)] + [SYSTEM[:5]]
    for prompt in prompts:  # one after another: each may find the previous one's blocks
        (out,) = _run(engine, [(prompt, _greedy(10))])
        assert out.token_ids == reference_greedy(ref, prompt, 10)
    _assert_pool_free(engine)
    # blocks behind every window went back without a key: nothing of a long prompt stays cached
    assert engine.block_manager.num_cached_blocks <= 24


def test_two_hundred_random_mixes_leave_the_pool_free(model) -> None:
    rng = random.Random(2024)
    engine = _engine(model, num_kv_blocks=18, max_num_seqs=4, max_num_batched_tokens=32)
    systems = [[rng.randrange(3, 90) for _ in range(rng.randint(2, 20))] for _ in range(4)]
    earlier: list[list[int]] = []
    reference: dict[tuple[int, ...], list[int]] = {}
    cold = _engine(model, cache=False, num_kv_blocks=64)
    checked = aborted = beams = 0
    preempted = []
    schedule = engine.scheduler.schedule

    def counting_schedule():
        out = schedule()
        preempted.extend(out.preempted)
        return out

    engine.scheduler.schedule = counting_schedule
    for mix in range(200):
        requests = []
        for _ in range(rng.randint(1, 5)):
            base = rng.choice(earlier) if earlier and rng.random() < 0.3 else rng.choice(systems)
            prompt = (base + [rng.randrange(3, 90) for _ in range(rng.randint(1, 6))])[-60:]
            requests.append((prompt, _greedy(rng.randint(1, 8))))
        ids = engine.add_requests(requests, detokenize=False)
        to_abort = {i for i in ids if rng.random() < 0.15}
        outputs, steps = {}, 0
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out
            steps += 1
            for rid in list(to_abort):
                if steps >= 2:
                    engine.abort(rid)
                    to_abort.discard(rid)
                    aborted += 1
        for rid, (prompt, _) in zip(ids, requests):
            out = outputs.get(rid)
            if out is None or out.finish_reason == "abort":
                continue
            earlier.append(prompt + out.token_ids)
            if mix % 10 == 0:  # compare with a cold engine now and then
                key = tuple(prompt)
                if key not in reference:
                    (ref,) = _run(cold, [(prompt, _greedy(8))])
                    reference[key] = ref.token_ids
                assert out.token_ids == reference[key][: len(out.token_ids)]
                checked += 1
        if mix % 7 == 0:  # beam forks over a cached prefix
            beam_search(engine, [rng.choice(systems) + [rng.randrange(3, 90)]],
                        BeamSearchParams(num_beams=2, max_tokens=3))
            beams += 1
        _assert_pool_free(engine)
    stats = engine.block_manager.prefix_cache_stats
    assert checked > 20 and aborted > 10 and beams > 20 and len(preempted) > 10
    assert stats.hits > 0 and stats.evictions > 0
    print(f"{checked} checked, {aborted} aborted, {beams} beam searches, {len(preempted)} preemptions, "
          f"hit rate {stats.hit_rate:.2f}, {stats.evictions} evictions")


@pytest.mark.usefixtures("one_torch_thread")
def test_a_prompt_gives_the_same_bits_however_it_is_chunked_or_cached(model) -> None:
    """The CPU runner pads a prompt chunk's attention to 16-row/16-key multiples and its dense matmuls
    to 16 rows (QUERY_QUANTUM, DENSE_ROW_FLOOR), so neither a cache hit's short tail nor another
    chunking changes a bit of any logit."""
    rng = random.Random(3)
    prompts = [SYSTEM + [rng.randrange(1, 90) for _ in range(rng.randint(1, 40))] for _ in range(6)]
    params = _greedy(output_logits=True)
    cold = _run(_engine(model, cache=False, max_num_seqs=1), [(p, params) for p in prompts])
    for budget in (16, 23, 40):  # chunked prefill: prompts cut at every budget's boundaries
        chunked = _run(_engine(model, cache=False, max_num_seqs=1, max_num_batched_tokens=budget),
                       [(p, params) for p in prompts])
        for c, w in zip(cold, chunked):
            assert w.token_ids == c.token_ids
            assert all(torch.equal(a, b) for a, b in zip(c.logits, w.logits)), budget
    engine = _engine(model, max_num_seqs=1)
    _run(engine, [(SYSTEM + [7], params)])
    warm = _run(engine, [(p, params) for p in prompts])
    assert all(o.metrics.num_cached_tokens == 12 for o in warm)
    for c, w in zip(cold, warm):
        assert all(torch.equal(a, b) for a, b in zip(c.logits, w.logits))


@pytest.mark.usefixtures("one_torch_thread")
def test_the_row_floor_rounds_a_narrow_call_as_a_wide_one() -> None:
    from tokenloom.models.linear import Linear
    from tokenloom.models.row_floor import dense_row_floor, row_floor

    torch.manual_seed(0)
    layer = Linear(576, 960)
    layer.weight.data.normal_()
    x = torch.randn(40, 576)
    wide = layer(x)
    with dense_row_floor():
        assert row_floor() == 16
        for rows in (2, 3, 15):
            assert torch.equal(layer(x[:rows]), wide[:rows]), rows
    assert row_floor() == 0
