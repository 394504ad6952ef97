"""The prefix cache's book-keeping (pure Python): chained block keys, matching, committing, LRU
eviction of idle blocks, the sliding window's releases, forks, and a random workload of the
scheduler alone that must leave the pool fully free with every reference count at zero."""

from __future__ import annotations

import random

from tokenloom.cache.block_manager import BlockManager
from tokenloom.cache.prefix_cache import block_key, root_key
from tokenloom.engine.scheduler import Scheduler
from tokenloom.engine.sequence import FREED_BLOCK, FinishReason, Sequence
from tokenloom.sampling_params import SamplingParams

BS = 4


def _seq(tokens: list[int], name: str = "s", max_tokens: int = 8) -> Sequence:
    return Sequence(name, list(tokens), SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), 0)


def _compute(manager: BlockManager, seq: Sequence) -> None:
    """What a step does to `seq`: blocks for all its tokens, all computed, full blocks committed."""
    manager.allocate(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    manager.commit(seq)


def test_keys_chain_the_whole_prefix_and_the_namespace() -> None:
    root = root_key("model-a")
    a = block_key(root, [1, 2, 3, 4])
    assert a == block_key(root_key("model-a"), [1, 2, 3, 4])
    assert a != block_key(root_key("model-b"), [1, 2, 3, 4])  # another model or mode
    assert a != block_key(root, [1, 2, 3, 5])
    # the same block after different parents is a different entry
    assert block_key(a, [9, 9, 9, 9]) != block_key(block_key(root, [1, 2, 3, 5]), [9, 9, 9, 9])
    assert block_key(root, [2**40]) != block_key(root, [0])  # ids are not truncated


def test_a_second_sequence_reuses_the_full_blocks_and_computes_at_least_one_token() -> None:
    manager = BlockManager(16, BS, enable_prefix_caching=True)
    first = _seq(list(range(10, 20)))  # 10 tokens: two full blocks
    _compute(manager, first)
    assert manager.num_cached_blocks == 2
    first_blocks = list(first.block_ids)
    manager.free(first)
    assert manager.num_free_blocks == 16  # idle cached blocks count as free

    second = _seq(list(range(10, 20)) + [7, 7])  # same 10, then more
    assert manager.match_prefix(second) == 10  # the two full blocks, then `first`'s tail (18, 19)
    assert second.block_ids == first_blocks
    assert second.num_computed_tokens == 10 and second.num_committed_blocks == 2

    exact = _seq(list(range(10, 18)))  # exactly two blocks long: the last token must be computed
    assert manager.match_prefix(exact) == 4
    assert manager.ref_count(exact.block_ids[0]) == 2  # shared with `second`
    manager.free(second)
    manager.free(exact)
    manager.check_consistency()
    assert manager.num_free_blocks == 16


def test_matching_stops_at_the_first_difference_and_is_off_unless_enabled() -> None:
    manager = BlockManager(16, BS, enable_prefix_caching=True)
    _compute(manager, _seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert manager.match_prefix(_seq([1, 2, 3, 4, 0, 6, 7, 8, 9])) == 4
    assert manager.match_prefix(_seq([0, 2, 3, 4, 5, 6, 7, 8, 9])) == 0
    off = BlockManager(16, BS)
    _compute(off, _seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert off.num_cached_blocks == 0 and off.match_prefix(_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])) == 0


def test_idle_blocks_are_evicted_oldest_first_and_only_when_no_plain_block_is_left() -> None:
    manager = BlockManager(4, BS, enable_prefix_caching=True)
    old, new = _seq([1] * 5, "old"), _seq([2] * 5, "new")
    _compute(manager, old)  # blocks: one full (cached), one partial
    _compute(manager, new)
    manager.free(old)  # its partial block is kept as a tail, idle like the full one
    manager.free(new)
    assert manager.num_cached_blocks == 2 and manager.num_free_blocks == 4
    taker = _seq([3] * 5, "taker")  # needs 2 blocks: no plain one is left, so the 2 oldest idle ones
    manager.allocate(taker, 5)
    assert manager.prefix_cache_stats.evictions == 2  # `old`'s tail (freed first), then its full block
    assert manager.match_prefix(_seq([1] * 6)) == 0  # `old` was evicted
    assert manager.match_prefix(_seq([2] * 6)) == 5  # `new` survived, tail and all


def test_a_block_freed_behind_the_window_is_no_cache_entry() -> None:
    manager = BlockManager(8, BS, enable_prefix_caching=True)
    seq = _seq(list(range(1, 14)))
    _compute(manager, seq)
    assert manager.num_cached_blocks == 3
    assert manager.free_blocks_before(seq, 8) == 2
    assert seq.block_ids[:2] == [FREED_BLOCK, FREED_BLOCK]
    assert manager.num_cached_blocks == 1
    manager.free(seq)
    manager.check_consistency()
    assert manager.match_prefix(_seq(list(range(1, 14)))) == 0  # the chain starts at a forgotten block


def test_a_fork_shares_keys_and_its_own_blocks_enter_the_cache() -> None:
    manager = BlockManager(8, BS, enable_prefix_caching=True)
    parent = _seq([5, 6, 7, 8, 9, 10])
    _compute(manager, parent)
    child = _seq([5, 6, 7, 8, 9, 10])
    child.token_ids = parent.token_ids + [11, 12]
    manager.fork(parent, child)
    child.num_computed_tokens = parent.num_computed_tokens
    for source, target in manager.copy_on_write(child, 2):  # the partial block is shared: copied
        assert manager.ref_count(source) == 1 and manager.ref_count(target) == 1
    manager.allocate(child, 2)
    child.num_computed_tokens += 2
    manager.commit(child)
    assert manager.num_cached_blocks == 2
    manager.free(parent)
    manager.free(child)
    assert manager.match_prefix(_seq([5, 6, 7, 8, 9, 10, 11, 12, 0])) == 8
    manager.check_consistency()


def test_random_scheduler_workloads_leave_the_pool_free() -> None:
    """200 workloads of the scheduler with a fake model: shared system prompts, chat-like
    continuations of earlier requests, aborts, a pool small enough to preempt. Each sequence's
    tokens are a function of its prefix, so a cached block always holds what a cold run would."""
    rng = random.Random(1234)
    preemptions = hits = 0
    for _ in range(200):
        num_blocks = rng.randint(6, 24)
        manager = BlockManager(num_blocks, BS, enable_prefix_caching=True)
        scheduler = Scheduler(manager, max_num_seqs=rng.randint(1, 6), max_num_batched_tokens=rng.randint(8, 40))
        systems = [[rng.randrange(50) for _ in range(rng.randint(1, 12))] for _ in range(3)]
        finished: list[list[int]] = []
        capacity = num_blocks * BS
        for step in range(rng.randint(5, 60)):
            if rng.random() < 0.4:
                if finished and rng.random() < 0.4:
                    prompt = rng.choice(finished) + [rng.randrange(50) for _ in range(rng.randint(1, 6))]
                else:
                    prompt = rng.choice(systems) + [rng.randrange(50) for _ in range(rng.randint(1, 10))]
                prompt = prompt[: capacity - 2]
                scheduler.add(_seq(prompt, f"r{step}", max_tokens=rng.randint(1, 10)))
            if rng.random() < 0.1 and (scheduler.running or scheduler.waiting):
                victim = rng.choice(scheduler.running + list(scheduler.waiting))
                scheduler.abort(victim.request_id)
            out = scheduler.schedule()
            preemptions += len(out.preempted)
            for item in out.scheduled:  # a computed block is committed only once computed
                assert item.seq.num_committed_blocks * BS <= item.seq.num_computed_tokens
            sampled = [sum(item.seq.token_ids) % 50 for item in out.scheduled if item.samples]
            for seq in scheduler.update(out, sampled):
                if seq.is_finished:
                    finished.append(seq.token_ids)
            manager.check_consistency()
        for seq in list(scheduler.running) + list(scheduler.waiting):
            scheduler.finish(seq, FinishReason.ABORT)
        manager.check_consistency()
        assert manager.num_free_blocks == num_blocks
        assert all(manager.ref_count(b) == 0 for b in range(num_blocks))
        hits += manager.prefix_cache_stats.hits
    assert preemptions > 0 and hits > 0  # the workloads did exercise both


def test_a_continuation_takes_over_the_tail_and_computes_from_where_it_ends() -> None:
    manager = BlockManager(8, BS, enable_prefix_caching=True)
    turn1 = _seq([1, 2, 3, 4, 5, 6])
    _compute(manager, turn1)
    blocks = list(turn1.block_ids)
    manager.free(turn1)  # block 1 holds 5, 6: a tail
    assert manager.num_free_blocks == 8 and manager.num_cached_blocks == 1
    turn2 = _seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert manager.match_prefix(turn2) == 6 and turn2.block_ids == blocks
    assert manager.ref_count(blocks[1]) == 1  # its own now: the next tokens are written into it
    other = _seq([1, 2, 3, 4, 5, 6, 0])  # the same prefix at once: the tail is taken, the full block shared
    assert manager.match_prefix(other) == 4 and manager.ref_count(blocks[0]) == 2
    _compute(manager, turn2)  # the taken tail fills up and is keyed as a full block
    assert manager.num_cached_blocks == 2
    manager.free(turn2)
    manager.free(other)
    manager.check_consistency()
    assert manager.match_prefix(_seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])) == 9  # two blocks and a tail (9)


def test_tails_match_their_longest_start_leave_the_last_token_and_need_their_whole_chain() -> None:
    manager = BlockManager(16, BS, enable_prefix_caching=True)
    for tokens in ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 9, 9]):
        seq = _seq(tokens)
        _compute(manager, seq)
        manager.free(seq)

    def match(tokens: list[int]) -> int:
        seq = _seq(tokens)
        found = manager.match_prefix(seq)
        manager.free(seq)  # gives the tail back (as a tail of what it computed: the same tokens)
        return found

    assert match([1, 2, 3, 4, 5, 6, 8]) == 5  # tails (5) and (5, 6, 7): only (5) fits
    assert match([1, 2, 3, 4, 5, 6, 7]) == 5  # (5, 6, 7) would leave no token to compute
    assert match([1, 2, 3, 4, 5, 6, 7, 0]) == 7
    assert match([1, 2, 3, 4, 9, 9, 9]) == 6
    assert match([0, 2, 3, 4, 5, 6, 7, 8]) == 0  # another first block: no tail after it
    manager.check_consistency()
    taken = BlockManager(16, BS, enable_prefix_caching=True)
    seq = _seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    _compute(taken, seq)
    taken.free_blocks_before(seq, 4)  # a window let go of block 0: the chain is broken
    taken.free(seq)
    taken.check_consistency()
    assert taken.match_prefix(_seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])) == 0


def test_a_shared_partial_block_becomes_a_tail_only_when_its_last_table_lets_go() -> None:
    manager = BlockManager(8, BS, enable_prefix_caching=True)
    parent = _seq([5, 6, 7, 8, 9, 10])
    _compute(manager, parent)
    child = _seq([5, 6, 7, 8, 9, 10])
    manager.fork(parent, child)
    child.num_computed_tokens = parent.num_computed_tokens
    manager.free(parent)
    assert manager.match_prefix(_seq([5, 6, 7, 8, 9, 10, 11])) == 4  # the child still holds it
    manager.free(child)
    manager.check_consistency()
    assert manager.match_prefix(_seq([5, 6, 7, 8, 9, 10, 11])) == 6


def test_reset_forgets_every_prefix_and_frees_the_idle_blocks() -> None:
    manager = BlockManager(8, BS, enable_prefix_caching=True)
    done, running = _seq([1, 2, 3, 4, 5, 6]), _seq([7, 8, 9, 10, 11])
    _compute(manager, done)
    _compute(manager, running)
    manager.free(done)  # one keyed block and a tail, idle
    manager.reset_prefix_cache()
    manager.check_consistency()
    assert manager.num_cached_blocks == 0 and manager.num_free_blocks == 6
    assert manager.match_prefix(_seq([1, 2, 3, 4, 5, 6, 7])) == 0
    assert manager.match_prefix(_seq([7, 8, 9, 10, 11, 12])) == 0  # the running one's block lost its key
    manager.free(running)
    manager.check_consistency()
    assert manager.num_free_blocks == 8


def _shadow_workload(seed: int, window: int | None) -> None:
    """The scheduler and block manager under chat-like continuations (which take tails), aborts,
    preemption, speculative runs accepted in part, stop-string deletions and sliding windows, with a
    shadow of every cache slot: each slot records the token prefix whose key and value it holds, and
    before every step each position a scheduled sequence attends must hold exactly its own prefix.
    Tokens are random, so a block or tail reused under the wrong prefix shows."""
    rng = random.Random(seed)
    num_blocks = max(rng.randint(6, 24), window // BS + 3 if window else 0)
    manager = BlockManager(num_blocks, BS, enable_prefix_caching=True)
    scheduler = Scheduler(manager, rng.randint(1, 6), rng.randint(8, 40), kv_window=window)
    shadow: dict[int, tuple[int, ...]] = {}
    finished: list[list[int]] = []
    systems = [[rng.randrange(6) for _ in range(rng.randint(1, 12))] for _ in range(3)]

    def slot(seq: Sequence, position: int) -> int:
        block = seq.block_ids[position // BS]
        assert block != FREED_BLOCK, (seq.request_id, position)
        return block * BS + position % BS

    for step in range(rng.randint(5, 80)):
        if rng.random() < 0.5:
            if finished and rng.random() < 0.6:  # a follow-up of a finished request, or a cut of it
                base = rng.choice(finished)
                prompt = base + [rng.randrange(6) for _ in range(rng.randint(0, 6))]
                if rng.random() < 0.3:
                    prompt = base[: rng.randint(1, len(base))] + [rng.randrange(6)]
            else:
                prompt = rng.choice(systems) + [rng.randrange(6) for _ in range(rng.randint(1, 10))]
            prompt = prompt[:60] if window else prompt[: num_blocks * BS - 2]
            scheduler.add(_seq(prompt, f"r{step}", rng.randint(1, 10)))
        if rng.random() < 0.1 and (scheduler.running or scheduler.waiting):
            scheduler.abort(rng.choice(scheduler.running + list(scheduler.waiting)).request_id)
        if not window:
            for seq in scheduler.running:
                if seq.num_computed_tokens == seq.num_tokens - 1 and rng.random() < 0.5:
                    seq.spec_token_ids = [rng.randrange(6) for _ in range(rng.randint(1, 4))]
        out = scheduler.schedule()
        for item in out.scheduled:
            seq, start = item.seq, item.seq.num_computed_tokens
            for position in range(0 if window is None else max(0, start - window + 1), start):
                assert shadow.get(slot(seq, position)) == tuple(seq.token_ids[: position + 1]), (seed, step, position)
            tokens = seq.token_ids + item.spec_token_ids
            for position in range(start, start + item.num_new_tokens):
                shadow[slot(seq, position)] = tuple(tokens[: position + 1])
        sampled: list = []
        for item in out.scheduled:
            if item.samples:
                accepted = item.spec_token_ids[: rng.randint(0, len(item.spec_token_ids))]
                sampled.append(accepted + [rng.randrange(6)] if item.spec_token_ids else rng.randrange(6))
        lengths = {id(item.seq): item.seq.num_tokens for item in out.scheduled}
        for seq in scheduler.update(out, sampled):
            new = seq.num_tokens - lengths[id(seq)]
            if new > 1 and rng.random() < 0.3:  # a stop string inside an accepted run: the rest dropped
                del seq.token_ids[-rng.randint(1, new - 1):]
                seq.num_computed_tokens = min(seq.num_computed_tokens, seq.num_tokens - 1)
                if not seq.is_finished:
                    scheduler.finish(seq, FinishReason.STOP)
            if seq.is_finished:
                finished.append(list(seq.token_ids))
        manager.check_consistency()
    for seq in list(scheduler.running) + list(scheduler.waiting):
        scheduler.finish(seq, FinishReason.ABORT)
    manager.check_consistency()
    assert manager.num_free_blocks == num_blocks


def test_every_attended_position_holds_its_own_prefix_under_random_workloads() -> None:
    for seed in range(150):
        for window in (None, 6, 9):
            _shadow_workload(seed, window)
