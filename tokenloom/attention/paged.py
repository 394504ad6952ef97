"""Attention over the paged KV cache with torch's SDPA (L1t). Any mix of prefill chunks and decode
tokens shares one flat batch: decode tokens (one query each) are attended in one batched call, and
each prefill chunk in a call of its own, so no query is padded to another sequence's length."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenloom.cache.kv_cache import KVCache


@dataclass
class AttentionGroup:
    """Sequences attended in one SDPA call.

    query_index: [batch, num_queries] flat token index of each query.
    token_index: [batch * num_queries] where each output row goes in the flat batch.
    context_slots: [batch, max_context] cache slots of each sequence's keys (padding points at
        slot 0 and is masked).
    mask: [batch, 1, num_queries, max_context], True where a query may attend a key; None when the
        group is one chunk computed from position 0, which is plain causal attention.
    """

    query_index: torch.Tensor
    token_index: torch.Tensor
    context_slots: torch.Tensor
    mask: torch.Tensor | None


@dataclass
class AttentionMetadata:
    """Built once per step by the model runner and shared by every layer.

    slot_mapping: [num_tokens] cache slot each new token's key/value is written to.
    """

    slot_mapping: torch.Tensor
    groups: list[AttentionGroup]

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
    ) -> AttentionMetadata:
        """query_lens[i] new tokens of sequence i end at position context_lens[i] - 1."""
        max_blocks = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in block_tables], dtype=torch.long)
        offsets = torch.arange(block_size, dtype=torch.long)
        all_slots = (tables[:, :, None] * block_size + offsets).reshape(len(block_tables), -1)

        starts, slot_rows = [], []
        start = 0
        for i, (q, ctx) in enumerate(zip(query_lens, context_lens)):
            starts.append(start)
            slot_rows.append(all_slots[i, ctx - q : ctx])
            start += q
        slot_mapping = torch.cat(slot_rows)

        groups = []
        decode = [i for i, q in enumerate(query_lens) if q == 1]
        if decode:
            ctx = torch.tensor([context_lens[i] for i in decode], dtype=torch.long)
            max_context = int(ctx.max())
            key_valid = torch.arange(max_context)[None, :] < ctx[:, None]  # [batch, max_context]
            token_index = torch.tensor([starts[i] for i in decode], dtype=torch.long)
            groups.append(
                AttentionGroup(
                    query_index=token_index[:, None].to(device),
                    token_index=token_index.to(device),
                    context_slots=torch.where(key_valid, all_slots[decode, :max_context], 0).to(device),
                    mask=key_valid[:, None, None, :].to(device),
                )
            )
        for i, (q, ctx) in enumerate(zip(query_lens, context_lens)):
            if q == 1:
                continue
            token_index = torch.arange(starts[i], starts[i] + q, dtype=torch.long)
            mask = None
            if ctx != q:  # a chunk after cached tokens: causal with an offset
                query_pos = torch.arange(ctx - q, ctx)
                mask = (torch.arange(ctx)[None, :] <= query_pos[:, None])[None, None].to(device)
            groups.append(
                AttentionGroup(
                    query_index=token_index[None, :].to(device),
                    token_index=token_index.to(device),
                    context_slots=all_slots[i : i + 1, :ctx].to(device),
                    mask=mask,
                )
            )
        return cls(slot_mapping=slot_mapping.to(device), groups=groups)


def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: KVCache,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """query: [num_tokens, num_heads, head_dim]; key/value: [num_tokens, num_kv_heads, head_dim].
    Writes key/value to the cache, attends over each sequence's context; returns
    [num_tokens, num_heads, head_dim]."""
    kv_cache.write(layer, meta.slot_mapping, key, value)
    num_heads, head_dim = query.shape[1], query.shape[2]
    gqa = key.shape[1] != num_heads
    if len(meta.groups) == 1:
        return _attend(query, kv_cache, layer, meta.groups[0], scale, gqa).reshape(-1, num_heads, head_dim)
    out = torch.empty_like(query)
    for group in meta.groups:
        out[group.token_index] = _attend(query, kv_cache, layer, group, scale, gqa).reshape(
            -1, num_heads, head_dim
        )
    return out


def _attend(
    query: torch.Tensor, kv_cache: KVCache, layer: int, group: AttentionGroup, scale: float, gqa: bool
) -> torch.Tensor:
    keys, values = kv_cache.gather(layer, group.context_slots)  # [batch, ctx, kv_heads, dim]
    q = query[group.query_index].transpose(1, 2)  # [batch, heads, num_queries, dim]
    out = F.scaled_dot_product_attention(
        q,
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=group.mask,
        is_causal=group.mask is None and q.shape[2] > 1,
        scale=scale,
        enable_gqa=gqa,
    )
    return out.transpose(1, 2)  # [batch, num_queries, heads, dim]
