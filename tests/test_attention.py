"""Paged attention against a direct per-sequence computation, for a step that mixes decode tokens,
a first prefill chunk and a later chunk, with and without a sliding window."""

from __future__ import annotations

import math
import random

import torch

from tokenloom.attention.paged import QUERY_QUANTUM, AttentionMetadata, paged_attention
from tokenloom.cache.kv_cache import KVCache
from tokenloom.engine.sequence import FREED_BLOCK

HEADS, KV_HEADS, DIM, BLOCK = 4, 2, 8, 4


def _reference(q, k, v, window=None):
    """Causal attention of the last q.shape[0] positions over all of k/v (one sequence); with a
    window, a query at position p sees keys p - window < k <= p (transformers' convention)."""
    num_q, ctx = q.shape[0], k.shape[0]
    k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
    v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(DIM)
    pos = torch.arange(ctx - num_q, ctx)
    key_pos = torch.arange(ctx)[None, None, :]
    hidden = key_pos > pos[None, :, None]
    if window is not None:
        hidden |= key_pos <= pos[None, :, None] - window
    scores = scores.masked_fill(hidden, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def test_mixed_step_matches_per_sequence_attention_without_padding_to_other_sequences():
    torch.manual_seed(0)
    # (tokens already cached, new tokens this step): two decodes, a first chunk, a later chunk
    plan = [(6, 1), (1, 1), (0, 9), (5, 7)]
    cache = KVCache(1, num_blocks=32, block_size=BLOCK, num_kv_heads=KV_HEADS, head_dim=DIM,
                    dtype=torch.float32, device=torch.device("cpu"))
    free = iter(range(32))
    full_k, full_v, tables = [], [], []
    for cached, new in plan:
        total = cached + new
        table = [next(free) for _ in range(-(-total // BLOCK))]
        tables.append(table)
        k, v = torch.randn(total, KV_HEADS, DIM), torch.randn(total, KV_HEADS, DIM)
        full_k.append(k)
        full_v.append(v)
        if cached:  # what earlier steps wrote
            slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(cached)])
            cache.write(0, slots, k[:cached], v[:cached])
    meta = AttentionMetadata.build(
        [new for _, new in plan], [c + n for c, n in plan], tables, BLOCK, torch.device("cpu")
    )
    num_tokens = sum(new for _, new in plan)
    # no query is padded to another sequence's length; a chunk pads only itself to QUERY_QUANTUM rows
    assert sum(g.query_index.numel() - g.padding for g in meta.groups) == num_tokens
    assert [g.padding for g in meta.groups] == [0, 16 - 9, 16 - 7]
    query = torch.randn(num_tokens, HEADS, DIM)
    new_k = torch.cat([k[c:] for k, (c, _) in zip(full_k, plan)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(full_v, plan)])
    out = paged_attention(query, new_k, new_v, cache, 0, meta, scale=1 / math.sqrt(DIM))
    start = 0
    for (_cached, new), k, v in zip(plan, full_k, full_v):
        expected = _reference(query[start : start + new], k, v)
        torch.testing.assert_close(out[start : start + new], expected, atol=1e-5, rtol=1e-5)
        start += new


def _mixed_step(plan, window, free_before=None):
    """Cache the earlier tokens of each (cached, new) sequence, attend the new ones; returns the
    output and the per-sequence references. free_before[i]: table entries below this are marked
    freed (their slots hold garbage) as the scheduler does behind a window."""
    torch.manual_seed(0)
    cache = KVCache(1, num_blocks=64, block_size=BLOCK, num_kv_heads=KV_HEADS, head_dim=DIM,
                    dtype=torch.float32, device=torch.device("cpu"))
    cache.keys[0].fill_(1e4)  # what a freed or foreign block might hold: must never be attended
    cache.values[0].fill_(1e4)
    free = iter(range(64))
    full_k, full_v, tables = [], [], []
    for i, (cached, new) in enumerate(plan):
        total = cached + new
        table = [next(free) for _ in range(-(-total // BLOCK))]
        k, v = torch.randn(total, KV_HEADS, DIM), torch.randn(total, KV_HEADS, DIM)
        if cached:
            slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(cached)])
            cache.write(0, slots, k[:cached], v[:cached])
        for b in range((free_before or {}).get(i, 0)):
            table[b] = FREED_BLOCK
        tables.append(table)
        full_k.append(k)
        full_v.append(v)
    meta = AttentionMetadata.build(
        [new for _, new in plan], [c + n for c, n in plan], tables, BLOCK, torch.device("cpu")
    )
    num_tokens = sum(new for _, new in plan)
    query = torch.randn(num_tokens, HEADS, DIM)
    new_k = torch.cat([k[c:] for k, (c, _) in zip(full_k, plan)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(full_v, plan)])
    out = paged_attention(query, new_k, new_v, cache, 0, meta, scale=1 / math.sqrt(DIM), sliding_window=window)
    expected, start = [], 0
    for (_cached, new), k, v in zip(plan, full_k, full_v):
        expected.append(_reference(query[start : start + new], k, v, window))
        start += new
    return out, torch.cat(expected), meta


def test_sliding_window_matches_a_windowed_reference():
    # decodes inside and beyond the window, a first chunk longer than the window, a later chunk
    # that straddles it, and a first chunk shorter than it
    plan = [(6, 1), (20, 1), (1, 1), (0, 13), (9, 7), (0, 3)]
    out, expected, meta = _mixed_step(plan, window=5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    decode = meta.groups_for(5)[0]
    assert decode.context_slots.shape[1] == 5  # only the window's keys are gathered


def test_window_skips_blocks_freed_behind_it():
    # blocks wholly before p - window + 1 of the oldest query are freed (garbage in the pool)
    plan = [(30, 1), (17, 6)]
    window = 6
    free_before = {0: (30 - window + 1) // BLOCK, 1: (17 - window + 1) // BLOCK}
    out, expected, _ = _mixed_step(plan, window, free_before)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_window_groups_are_built_once_per_window_and_shared_with_full_when_nothing_is_cut():
    meta = AttentionMetadata.build([1, 4], [9, 4], [[0, 1, 2], [3]], BLOCK, torch.device("cpu"))
    assert meta.groups_for(4) is meta.groups_for(4)
    assert meta.groups_for(4) is not meta.groups_for(None)
    assert meta.groups_for(9) is meta.groups_for(None)  # a window as long as every context


def _python_slot(table, pos):
    block = table[pos // BLOCK]
    assert block != FREED_BLOCK, f"position {pos} lies in a freed block"
    return block * BLOCK + pos % BLOCK


def _random_step(rng, num_seqs, window):
    """A random mix of decodes and prefill chunks over shuffled block ids; some tables carry spare
    trailing blocks, and with a window the blocks wholly behind every query's window are freed."""
    query_lens, context_lens, tables = [], [], []
    ids = list(range(4096))
    rng.shuffle(ids)
    for _ in range(num_seqs):
        q = 1 if rng.random() < 0.6 else rng.randint(2, 20)
        ctx = q + (rng.randint(0, 60) if rng.random() < 0.8 else 0)
        nb = -(-ctx // BLOCK) + rng.choice([0, 0, 1])
        table = [ids.pop() for _ in range(nb)]
        if window is not None:
            for b in range(max(0, ctx - q - window + 1) // BLOCK):
                table[b] = FREED_BLOCK
        query_lens.append(q)
        context_lens.append(ctx)
        tables.append(table)
    return query_lens, context_lens, tables


def _attended_slots(meta, window):
    """token index -> the cache slots its query attends, read back from the groups."""
    attended = {}
    for group in meta.groups_for(window):
        num_queries, num_keys = group.query_index.shape[1], group.context_slots.shape[1]
        for b in range(group.query_index.shape[0]):
            for j in range(num_queries - group.padding):  # padded queries repeat the last one
                if group.mask is not None:
                    allowed = group.mask[b, 0, j]
                elif num_queries > 1:  # is_causal: top-left aligned
                    allowed = torch.arange(num_keys) <= j
                else:
                    allowed = torch.ones(num_keys, dtype=torch.bool)
                token = int(group.query_index[b, j])
                assert token not in attended
                attended[token] = group.context_slots[b][allowed].tolist()
    return attended


def test_device_built_slots_and_masks_match_a_python_construction():
    rng = random.Random(0)
    for trial in range(40):
        window = rng.choice([None, None, 3, 7, 16, 40])
        uniform = trial % 5 == 0
        query_lens, context_lens, tables = _random_step(rng, rng.randint(1, 9), window)
        if uniform:  # a decode-only step with equally long tables (the unpadded path)
            query_lens = [1] * len(query_lens)
            width = max(len(t) for t in tables)
            tables = [t + [t[-1]] * (width - len(t)) for t in tables]
            context_lens = [max(c, (width - 1) * BLOCK + 1) for c in context_lens]
        input_ids = [rng.randint(0, 999) for _ in range(sum(query_lens))]
        meta = AttentionMetadata.build(
            query_lens, context_lens, tables, BLOCK, torch.device("cpu"), input_ids=input_ids
        )
        positions = [p for q, c in zip(query_lens, context_lens) for p in range(c - q, c)]
        rows = [i for i, q in enumerate(query_lens) for _ in range(q)]
        assert meta.input_ids.tolist() == input_ids
        assert meta.positions.tolist() == positions
        assert meta.slot_mapping.tolist() == [_python_slot(tables[i], p) for i, p in zip(rows, positions)]
        attended = _attended_slots(meta, window)
        assert sorted(attended) == list(range(len(positions)))
        for token, (i, p) in enumerate(zip(rows, positions)):
            first = max(0, p - window + 1) if window is not None else 0
            expected = [_python_slot(tables[i], k) for k in range(first, p + 1)]
            assert attended[token] == expected, (trial, window, token)
        decode = [i for i, q in enumerate(query_lens) if q == 1]
        if decode:  # decodes share one batched group
            assert meta.groups_for(window)[0].query_index.shape == (len(decode), 1)
        assert len(meta.groups_for(window)) == bool(decode) + len(query_lens) - len(decode)


def test_first_chunk_is_plain_causal_without_a_mask():
    meta = AttentionMetadata.build([5, 1], [5, 9], [[2, 0], [1, 3, 4]], BLOCK, torch.device("cpu"))
    decode, chunk = meta.groups
    # five keys, then the last one again up to QUERY_QUANTUM (only padded queries reach them)
    assert chunk.mask is None and chunk.context_slots.tolist() == [[8, 9, 10, 11, 0] + [0] * 11]
    assert decode.mask is None and decode.context_slots.shape == (1, 9)


def test_padded_queries_repeat_the_last_query_and_its_mask():
    meta = AttentionMetadata.build([5, 3], [5, 9], [[2, 0], [1, 3, 4]], BLOCK, torch.device("cpu"))
    first, later = meta.groups
    assert (first.padding, later.padding) == (QUERY_QUANTUM - 5, QUERY_QUANTUM - 3)
    assert first.query_index.tolist() == [[0, 1, 2, 3, 4] + [4] * 11]
    assert later.query_index.tolist() == [[5, 6, 7] + [7] * 13]
    assert later.token_index.tolist() == [5, 6, 7]
    assert (later.mask[0, 0, 3:] == later.mask[0, 0, 2]).all()  # the last query's keys: 0..8


def _cached_chunk_outputs(prompt_len, splits):
    """Attention outputs of one sequence's prompt computed in chunks cut at `splits` (each chunk in
    its own step over the keys the earlier chunks cached), concatenated: [prompt_len, heads, dim]."""
    torch.manual_seed(0)
    q = torch.randn(prompt_len, 9, 64)
    k, v = torch.randn(prompt_len, 3, 64), torch.randn(prompt_len, 3, 64)
    cache = KVCache(1, num_blocks=16, block_size=16, num_kv_heads=3, head_dim=64,
                    dtype=torch.float32, device=torch.device("cpu"))
    table = list(range(-(-prompt_len // 16)))
    outs, start = [], 0
    for end in [*splits, prompt_len]:
        meta = AttentionMetadata.build([end - start], [end], [table], 16, torch.device("cpu"))
        outs.append(paged_attention(q[start:end], k[start:end], v[start:end], cache, 0, meta, scale=0.125))
        start = end
    return torch.cat(outs)


def test_a_prompt_token_attends_to_the_same_bits_however_its_prompt_was_chunked():
    """SDPA's CPU kernel cuts a chunk's queries into blocks from its first query, and rounds a block
    of fewer than 16 rows differently: padding each chunk to QUERY_QUANTUM rows makes a token's
    output independent of where its chunk started (a prefix-cache hit computes only the tail)."""
    cold = _cached_chunk_outputs(82, [])
    for splits in ([48], [64], [80], [33], [16, 40, 70]):
        assert torch.equal(_cached_chunk_outputs(82, splits), cold), splits
