"""Paged attention against a direct per-sequence computation, for a step that mixes decode tokens,
a first prefill chunk and a later chunk."""

from __future__ import annotations

import math

import torch

from tokenloom.attention.paged import AttentionMetadata, paged_attention
from tokenloom.cache.kv_cache import KVCache

HEADS, KV_HEADS, DIM, BLOCK = 4, 2, 8, 4


def _reference(q, k, v):
    """Causal attention of the last q.shape[0] positions over all of k/v (one sequence)."""
    num_q, ctx = q.shape[0], k.shape[0]
    k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
    v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(DIM)
    pos = torch.arange(ctx - num_q, ctx)
    scores = scores.masked_fill(torch.arange(ctx)[None, None, :] > pos[None, :, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def test_mixed_step_matches_per_sequence_attention_without_padding_queries():
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
    assert sum(g.query_index.numel() for g in meta.groups) == num_tokens  # no padded queries
    query = torch.randn(num_tokens, HEADS, DIM)
    new_k = torch.cat([k[c:] for k, (c, _) in zip(full_k, plan)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(full_v, plan)])
    out = paged_attention(query, new_k, new_v, cache, 0, meta, scale=1 / math.sqrt(DIM))
    start = 0
    for (_cached, new), k, v in zip(plan, full_k, full_v):
        expected = _reference(query[start : start + new], k, v)
        torch.testing.assert_close(out[start : start + new], expected, atol=1e-5, rtol=1e-5)
        start += new
