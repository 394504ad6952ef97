"""Decode-only steps through DecodeMetadata (what the compiled decode captures and the eager path
uses for such steps): whole-block reads, windows reading only their last blocks, freed blocks
behind a window, padding rows writing to the scratch slot, and a lone sequence with consecutive
blocks read as a view of the pool. Each against a direct per-sequence computation."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tokenloom.attention.decode import DecodeMetadata
from tokenloom.attention.paged import paged_attention
from tokenloom.cache.kv_cache import KVCache
from tokenloom.engine.sequence import FREED_BLOCK

from .test_attention import BLOCK, DIM, HEADS, KV_HEADS, _reference

CPU = torch.device("cpu")


def _decode_step(contexts, window=None, shuffle=True, free_behind_window=False, seed=0):
    """Cache contexts[i] - 1 tokens of each sequence, then attend its next one through DecodeMetadata."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    cache = KVCache(1, num_blocks=96, block_size=BLOCK, num_kv_heads=KV_HEADS, head_dim=DIM,
                    dtype=torch.float32, device=CPU)
    cache.keys[0].fill_(1e4)  # what an unused or freed block might hold: must never be attended
    cache.values[0].fill_(1e4)
    ids = list(range(96))
    if shuffle:
        rng.shuffle(ids)
    free = iter(ids)
    tables, full_k, full_v = [], [], []
    for ctx in contexts:
        table = [next(free) for _ in range(-(-ctx // BLOCK))]
        k, v = torch.randn(ctx, KV_HEADS, DIM), torch.randn(ctx, KV_HEADS, DIM)
        slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(ctx - 1)], dtype=torch.long)
        cache.write(0, slots, k[:-1], v[:-1])
        if free_behind_window and window:
            for b in range(max(0, ctx - window) // BLOCK):
                table[b] = FREED_BLOCK
        tables.append(table)
        full_k.append(k)
        full_v.append(v)
    meta = DecodeMetadata.build([5] * len(contexts), contexts, tables, BLOCK, CPU, cache.scratch_slot)
    query = torch.randn(len(contexts), HEADS, DIM)
    new_k = torch.stack([k[-1] for k in full_k])
    new_v = torch.stack([v[-1] for v in full_v])
    out = paged_attention(query, new_k, new_v, cache, 0, meta, scale=1 / math.sqrt(DIM), sliding_window=window)
    expected = torch.cat([_reference(query[i : i + 1], k, v, window) for i, (k, v) in enumerate(zip(full_k, full_v))])
    return out, expected, meta


@pytest.mark.parametrize("window", [None, 5, 9])
def test_batch_of_decodes_matches_per_sequence_attention(window):
    out, expected, meta = _decode_step([1, 4, 5, 17, 33, 2], window)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    group = meta.groups_for(window)[0]
    if window is not None:  # a window reads its last blocks only, whatever the longest context
        assert group.context_blocks.shape[1] == -(-window // BLOCK) + 1


def test_blocks_freed_behind_a_window_are_never_read():
    out, expected, _ = _decode_step([30, 21, 7], window=6, free_behind_window=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 6])
def test_a_lone_sequence_with_consecutive_blocks_reads_a_view(window):
    out, expected, meta = _decode_step([37], window, shuffle=False)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    group = meta.groups_for(window)[0]
    first = meta.first_block * BLOCK
    assert group.context_range == (first + (37 - window if window else 0), first + 37)
    # shuffled blocks: the same step gathers them instead
    out, expected, meta = _decode_step([37], window, shuffle=True, seed=1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert meta.first_block is None


def test_padding_rows_write_only_the_scratch_slot():
    host = DecodeMetadata.pack([7, 8], [5, 2], [[3, 4], [9]], BLOCK, num_rows=4, max_blocks=3, scratch_slot=40)
    assert host.shape == (4, 7)
    assert host[:, 0].tolist() == [7, 8, 0, 0]  # token ids
    assert host[:, 1].tolist() == [4, 1, 0, 0]  # positions
    assert host[:, 2].tolist() == [4 * BLOCK + 0, 9 * BLOCK + 1, 40, 40]  # slots: padding writes the scratch slot
    assert host[:, 3].tolist() == [5, 2, 1, 1]  # context lengths: a padding row attends its one key
    assert host[:, 4:].tolist() == [[3, 4, 0], [9, 0, 0], [10, 0, 0], [10, 0, 0]]
