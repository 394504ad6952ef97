"""Attention over the paged KV cache with torch's SDPA (L1t). Works for any mix of prefill chunks
and decode tokens in one flat batch: queries are laid out per sequence, keys gathered by slot."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenloom.cache.kv_cache import KVCache


@dataclass
class AttentionMetadata:
    """Built once per step by the model runner and shared by every layer.

    slot_mapping: [num_tokens] cache slot each new token's key/value is written to.
    query_index: [batch, max_query] flat token index of each sequence's queries (padding repeats
        the sequence's last query; its output is dropped).
    output_index: [num_tokens] position of each flat token in the padded [batch * max_query] layout.
    context_slots: [batch, max_context] cache slots of each sequence's keys (padding points at slot 0
        and is masked).
    mask: [batch, 1, max_query, max_context] True where a query may attend a key.
    """

    slot_mapping: torch.Tensor
    query_index: torch.Tensor
    output_index: torch.Tensor
    context_slots: torch.Tensor
    mask: torch.Tensor

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
        batch = len(query_lens)
        max_query = max(query_lens)
        max_context = max(context_lens)
        max_blocks = max(len(t) for t in block_tables)
        q_lens = torch.tensor(query_lens, dtype=torch.long)
        ctx_lens = torch.tensor(context_lens, dtype=torch.long)
        starts = torch.cumsum(q_lens, 0) - q_lens  # [batch]

        tables = torch.zeros((batch, max_blocks), dtype=torch.long)
        for i, table in enumerate(block_tables):
            tables[i, : len(table)] = torch.tensor(table, dtype=torch.long)
        offsets = torch.arange(block_size, dtype=torch.long)
        all_slots = (tables[:, :, None] * block_size + offsets).reshape(batch, -1)  # [batch, max_blocks*bs]
        key_pos = torch.arange(max_context, dtype=torch.long)
        key_valid = key_pos[None, :] < ctx_lens[:, None]  # [batch, max_context]
        context_slots = torch.where(key_valid, all_slots[:, :max_context], 0)

        q_off = torch.arange(max_query, dtype=torch.long)
        q_off_clamped = torch.minimum(q_off[None, :], (q_lens - 1)[:, None])  # [batch, max_query]
        query_index = starts[:, None] + q_off_clamped
        query_pos = (ctx_lens - q_lens)[:, None] + q_off_clamped  # absolute position of each query
        mask = (key_pos[None, None, :] <= query_pos[:, :, None]) & key_valid[:, None, :]

        seq_of_token = torch.repeat_interleave(torch.arange(batch), q_lens)  # [num_tokens]
        offset_in_seq = torch.arange(len(seq_of_token)) - starts[seq_of_token]
        token_pos = (ctx_lens - q_lens)[seq_of_token] + offset_in_seq
        slot_mapping = all_slots[seq_of_token, token_pos]
        output_index = seq_of_token * max_query + offset_in_seq
        return cls(
            slot_mapping=slot_mapping.to(device),
            query_index=query_index.to(device),
            output_index=output_index.to(device),
            context_slots=context_slots.to(device),
            mask=mask[:, None].to(device),
        )


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
    keys, values = kv_cache.gather(layer, meta.context_slots)  # [batch, ctx, kv_heads, dim]
    q = query[meta.query_index].transpose(1, 2)  # [batch, heads, max_query, dim]
    k = keys.transpose(1, 2)
    v = values.transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=meta.mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )  # [batch, heads, max_query, dim]
    out = out.transpose(1, 2).reshape(-1, query.shape[1], query.shape[2])
    return out[meta.output_index]
