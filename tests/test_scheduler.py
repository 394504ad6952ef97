"""Scheduler and block manager: pure Python, driven without a model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tokenloom.cache.block_manager import BlockManager
from tokenloom.engine.scheduler import Scheduler
from tokenloom.engine.sequence import FREED_BLOCK, FinishReason, Sequence, SequenceStatus
from tokenloom.sampling_params import SamplingParams


def make_seq(rid: str, length: int, max_tokens: int = 4, stop: list[int] | None = None, index: int = 0):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, stop_token_ids=stop or [])
    return Sequence(rid, list(range(1, length + 1)), params, index)


def run_step(sched: Scheduler, token: int = 7):
    out = sched.schedule()
    plan = [(s.num_new_tokens, s.samples) for s in out.scheduled]
    sampled = [token for s in out.scheduled if s.samples]
    sched.update(out, sampled)
    return out, plan


def test_blocks_are_allocated_as_tokens_arrive():
    bm = BlockManager(num_blocks=10, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    seq = make_seq("a", 5, max_tokens=10)
    sched.add(seq)
    run_step(sched)
    assert len(seq.block_ids) == 2  # 5 prompt tokens -> 2 blocks of 4
    run_step(sched)  # computes token 6
    run_step(sched)  # computes token 7
    run_step(sched)  # computes token 8: still 2 blocks
    assert len(seq.block_ids) == 2
    run_step(sched)  # computes token 9: a third block
    assert len(seq.block_ids) == 3
    assert bm.num_free_blocks == 7


def test_long_prompt_is_prefilled_in_chunks_within_the_token_budget():
    bm = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=8)
    seq = make_seq("a", 20)
    sched.add(seq)
    chunks = []
    for _ in range(3):
        _, plan = run_step(sched)
        chunks.append(plan)
    assert chunks == [[(8, False)], [(8, False)], [(4, True)]]
    assert seq.num_output_tokens == 1


def test_decode_and_prefill_share_a_step():
    bm = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a = make_seq("a", 3, max_tokens=5)
    sched.add(a)
    run_step(sched)
    b = make_seq("b", 6, index=1)
    sched.add(b)
    out, _ = run_step(sched)
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 6)]


def test_stop_token_and_length_finish_and_free_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a = make_seq("a", 3, max_tokens=10, stop=[7])
    b = make_seq("b", 3, max_tokens=2, index=1)
    sched.add(a)
    sched.add(b)
    run_step(sched, token=7)
    assert a.finish_reason is FinishReason.EOS and a.block_ids == []
    run_step(sched, token=5)
    assert b.finish_reason is FinishReason.LENGTH and b.status is SequenceStatus.FINISHED
    assert bm.num_free_blocks == 8 and not sched.has_unfinished()


def test_min_tokens_defers_the_stop_token():
    seq = make_seq("a", 2, max_tokens=10, stop=[7])
    seq.params = SamplingParams(temperature=0, max_tokens=10, min_tokens=2, stop_token_ids=[7])
    seq.append_token(7)
    assert seq.check_stop() is None
    seq.append_token(7)
    assert seq.check_stop() is FinishReason.EOS


def test_preemption_frees_the_newest_and_recomputes_it_later():
    bm = BlockManager(num_blocks=5, block_size=2)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a = make_seq("a", 4, max_tokens=6)
    b = make_seq("b", 4, max_tokens=6, index=1)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # each holds 2 blocks; one block is free
    assert bm.num_free_blocks == 1
    out, _ = run_step(sched)  # a takes the free block; b needs one too: b is preempted
    assert out.preempted == [b] and b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert b.token_ids[-1] == 7  # its generated token is kept and will be recomputed
    while sched.has_unfinished():
        run_step(sched)
    assert a.num_output_tokens == 6 and b.num_output_tokens == 6
    assert bm.num_free_blocks == 5


def test_a_sequence_that_outgrows_the_whole_pool_finishes_with_length():
    bm = BlockManager(num_blocks=3, block_size=2)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    seq = make_seq("a", 4, max_tokens=100)
    sched.add(seq)
    for _ in range(10):
        if not sched.has_unfinished():
            break
        run_step(sched)
    assert seq.finish_reason is FinishReason.LENGTH and seq.num_tokens == 6
    assert bm.num_free_blocks == 3


def test_abort_frees_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a = make_seq("a", 5)
    sched.add(a)
    run_step(sched)
    assert sched.abort("a") is a
    assert a.finish_reason is FinishReason.ABORT and bm.num_free_blocks == 8
    assert sched.abort("missing") is None


def test_prompt_larger_than_the_cache_is_rejected():
    sched = Scheduler(BlockManager(num_blocks=2, block_size=4), max_num_seqs=4, max_num_batched_tokens=64)
    with pytest.raises(ValueError, match="cannot fit the KV cache"):
        sched.add(make_seq("a", 8))


def test_free_blocks_before_releases_whole_blocks_and_keeps_table_positions():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq("a", 14)
    bm.allocate(seq, 14)  # positions 0..13 in 4 blocks
    table = list(seq.block_ids)
    assert bm.free_blocks_before(seq, 7) == 1  # block 0 (0..3) is wholly before 7, block 1 (4..7) is not
    assert seq.block_ids == [FREED_BLOCK, *table[1:]]
    assert bm.free_blocks_before(seq, 7) == 0  # nothing more to release
    assert bm.free_blocks_before(seq, 12) == 2
    assert seq.block_ids == [FREED_BLOCK, FREED_BLOCK, FREED_BLOCK, table[3]]
    assert bm.num_held_blocks(seq) == 1 and bm.num_free_blocks == 7
    assert bm.free_blocks_before(seq, -5) == 0  # before the first position: nothing
    seq.num_computed_tokens = 14
    bm.allocate(seq, 3)  # positions 14..16: the table grows by position, one new block
    assert len(seq.block_ids) == 5 and bm.num_free_blocks == 6
    bm.free(seq)  # freed entries are skipped, the rest go back
    assert seq.block_ids == [] and seq.num_freed_blocks == 0 and bm.num_free_blocks == 8


def _assert_window_blocks(seq: Sequence, window: int, block_size: int) -> None:
    """Blocks wholly before the next query's window are freed; every other block is held."""
    oldest_needed = seq.num_computed_tokens - window + 1
    for index, block_id in enumerate(seq.block_ids):
        assert (block_id == FREED_BLOCK) == ((index + 1) * block_size <= oldest_needed), (index, seq.block_ids)


def test_window_frees_blocks_behind_each_sequence_and_bounds_its_blocks():
    window, block_size = 6, 2
    bm = BlockManager(num_blocks=20, block_size=block_size)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=5, kv_window=window)
    a = make_seq("a", 13, max_tokens=40)
    b = make_seq("b", 3, max_tokens=40, index=1)
    sched.add(a)
    sched.add(b)
    most = -(-(window - 1) // block_size) + 1  # blocks a window of positions can touch
    while sched.has_unfinished():
        run_step(sched)  # a's prompt goes in chunks of at most 5
        for seq in sched.running:
            _assert_window_blocks(seq, window, block_size)
            assert bm.num_held_blocks(seq) <= most
    assert a.num_output_tokens == 40 and b.num_output_tokens == 40
    assert bm.num_free_blocks == 20


def test_window_lets_a_sequence_outgrow_the_pool_up_to_its_context_length():
    bm = BlockManager(num_blocks=4, block_size=2)  # 8 tokens of pool
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, kv_window=4)
    seq = make_seq("a", 11, max_tokens=100)  # a prompt longer than the pool
    seq.max_total_tokens = 30
    sched.add(seq)
    plans = []
    while sched.has_unfinished():
        plans.append(run_step(sched)[1])
        if not seq.is_finished:
            _assert_window_blocks(seq, 4, 2)
    # the prompt is computed in chunks that fit the pool as old blocks are freed behind the window
    assert plans[0] == [(8, False)] and plans[1] == [(3, True)]
    assert seq.finish_reason is FinishReason.LENGTH and seq.num_tokens == 30
    assert bm.num_free_blocks == 4


def test_window_pool_must_hold_one_window():
    sched = Scheduler(BlockManager(num_blocks=2, block_size=4), 4, 64, kv_window=9)
    with pytest.raises(ValueError, match="sliding window of 9 positions needs at least 3 blocks"):
        sched.add(make_seq("a", 3))


def test_window_preemption_recomputes_from_position_zero():
    window, block_size = 4, 2
    bm = BlockManager(num_blocks=5, block_size=block_size)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, kv_window=window)
    a = make_seq("a", 4, max_tokens=12)
    b = make_seq("b", 4, max_tokens=12, index=1)
    sched.add(a)
    sched.add(b)
    preempted = []
    while sched.has_unfinished():
        out, _ = run_step(sched)
        preempted += out.preempted
        for seq in sched.running:
            _assert_window_blocks(seq, window, block_size)
    # a window of 4 plus the next token touches up to 3 blocks of 2: 5 blocks cannot hold two
    assert b in preempted
    assert a.num_output_tokens == 12 and b.num_output_tokens == 12
    assert bm.num_free_blocks == 5


def test_lower_layers_do_not_import_torch():
    code = (
        "import sys; import tokenloom.config, tokenloom.sampling_params, tokenloom.outputs, "
        "tokenloom.engine.sequence, tokenloom.engine.scheduler, tokenloom.cache.block_manager, "
        "tokenloom.cache.prefix_cache; "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
