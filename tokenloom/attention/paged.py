"""Attention over the paged KV cache with torch's SDPA (L1t). Any mix of prefill chunks and decode
tokens shares one flat batch: decode tokens (one query each) are attended in one batched call, and
each prefill chunk in a call of its own, so no query is padded to another sequence's length.

Sliding-window layers (transformers' convention: a query at position p attends keys at positions k
with p - window < k <= p) gather only their window's slots; their groups are built on first use and
cached on the step's AttentionMetadata, once per window size, for every layer that shares it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tokenloom.cache.kv_cache import KVCache


@dataclass
class AttentionGroup:
    """Sequences attended in one SDPA call.

    query_index: [batch, num_queries] flat token index of each query.
    token_index: [batch * num_queries] where each output row goes in the flat batch.
    context_slots: [batch, num_keys] cache slots of each sequence's keys (padding points at slot 0
        and is masked).
    mask: [batch, 1, num_queries, num_keys], True where a query may attend a key; None when the
        group is one chunk computed from position 0 that no window cuts, which is plain causal
        attention.
    """

    query_index: torch.Tensor
    token_index: torch.Tensor
    context_slots: torch.Tensor
    mask: torch.Tensor | None


@dataclass
class AttentionMetadata:
    """Built once per step by the model runner and shared by every layer.

    slot_mapping: [num_tokens] cache slot each new token's key/value is written to.
    query_lens / context_lens / block_tables: the step, per sequence (query_lens[i] new tokens end
        at position context_lens[i] - 1; block_tables[i][b] holds positions b * block_size onwards,
        a negative entry marks a block freed because no layer's window reaches it any more).
    """

    slot_mapping: torch.Tensor
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    block_size: int
    device: torch.device
    _groups: dict[int | None, list[AttentionGroup]] = field(default_factory=dict, repr=False)

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
        starts = [ctx - q for q, ctx in zip(query_lens, context_lens)]
        slots, valid = _position_slots(block_tables, starts, context_lens, block_size)
        return cls(
            slot_mapping=slots[valid].to(device),  # row-major: the flat batch's order
            query_lens=list(query_lens),
            context_lens=list(context_lens),
            block_tables=block_tables,
            block_size=block_size,
            device=device,
        )

    @property
    def groups(self) -> list[AttentionGroup]:
        """The groups of full (unwindowed) attention."""
        return self.groups_for(None)

    def groups_for(self, window: int | None) -> list[AttentionGroup]:
        """The groups for layers attending the last `window` positions (None: the whole context),
        built on first use and kept for the step's other layers."""
        if window is not None and max(self.context_lens) <= window:
            window = None  # no window cuts any sequence this step: the full groups are the same
        groups = self._groups.get(window)
        if groups is None:
            groups = self._build_groups(window)
            self._groups[window] = groups
        return groups

    def _build_groups(self, window: int | None) -> list[AttentionGroup]:
        device = self.device
        starts, index = [], 0
        for q in self.query_lens:
            starts.append(index)
            index += q
        groups = []
        decode = [i for i, q in enumerate(self.query_lens) if q == 1]
        if decode:
            ends = [self.context_lens[i] for i in decode]
            first = [max(0, e - window) if window else 0 for e in ends]
            tables = [self.block_tables[i] for i in decode]
            slots, key_valid = _position_slots(tables, first, ends, self.block_size)
            token_index = torch.tensor([starts[i] for i in decode], dtype=torch.long)
            groups.append(
                AttentionGroup(
                    query_index=token_index[:, None].to(device),
                    token_index=token_index.to(device),
                    context_slots=slots.to(device),
                    # every valid key lies in the window and at or before the query
                    mask=None if bool(key_valid.all()) else key_valid[:, None, None, :].to(device),
                )
            )
        for i, (q, ctx) in enumerate(zip(self.query_lens, self.context_lens)):
            if q == 1:
                continue
            first_query = ctx - q
            first_key = max(0, first_query - window + 1) if window else 0
            slots, _ = _position_slots([self.block_tables[i]], [first_key], [ctx], self.block_size)
            token_index = torch.arange(starts[i], starts[i] + q, dtype=torch.long)
            mask = None
            if first_query != 0 or (window is not None and q > window):
                query_pos = torch.arange(first_query, ctx)[:, None]
                key_pos = torch.arange(first_key, ctx)[None, :]
                allowed = key_pos <= query_pos
                if window is not None:
                    allowed &= key_pos > query_pos - window
                mask = allowed[None, None].to(device)
            groups.append(
                AttentionGroup(
                    query_index=token_index[None, :].to(device),
                    token_index=token_index.to(device),
                    context_slots=slots.to(device),
                    mask=mask,
                )
            )
        return groups


def _position_slots(
    block_tables: list[list[int]], starts: list[int], ends: list[int], block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache slots of positions starts[i] .. ends[i] - 1 of each sequence, left-aligned and padded.

    Returns slots [n, max_len] (padding and freed blocks point at slot 0) and valid [n, max_len].
    Only the blocks the ranges touch are read, so a long sequence's window costs the window."""
    first_blocks = [s // block_size for s in starts]
    rows = [table[f : -(-e // block_size)] for table, f, e in zip(block_tables, first_blocks, ends)]
    width = max(len(r) for r in rows)
    blocks = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long).clamp_(min=0)
    offsets = torch.arange(block_size, dtype=torch.long)
    all_slots = (blocks[:, :, None] * block_size + offsets).reshape(len(rows), -1)  # [n, width * bs]
    lengths = torch.tensor([e - s for s, e in zip(starts, ends)], dtype=torch.long)
    shift = torch.tensor([s - f * block_size for s, f in zip(starts, first_blocks)], dtype=torch.long)
    steps = torch.arange(int(lengths.max()), dtype=torch.long)[None, :]
    valid = steps < lengths[:, None]
    index = (shift[:, None] + steps).clamp_(max=all_slots.shape[1] - 1)
    slots = torch.where(valid, all_slots.gather(1, index), 0)
    return slots, valid


def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: KVCache,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """query: [num_tokens, num_heads, head_dim]; key/value: [num_tokens, num_kv_heads, head_dim].
    Writes key/value to the cache, attends over each sequence's context (its last `sliding_window`
    positions when set); returns [num_tokens, num_heads, head_dim].

    `softcap` (Gemma 2's attn_logit_softcapping, scores = cap * tanh(scores / cap)) needs a manual
    path SDPA cannot take; no supported architecture uses it yet (Gemma 3's modeling ignores the
    key), so it is refused rather than silently dropped."""
    if softcap is not None:
        raise NotImplementedError(f"softcap={softcap}: attention logit softcapping is not implemented")
    kv_cache.write(layer, meta.slot_mapping, key, value)
    num_heads, head_dim = query.shape[1], query.shape[2]
    gqa = key.shape[1] != num_heads
    groups = meta.groups_for(sliding_window)
    if len(groups) == 1:
        return _attend(query, kv_cache, layer, groups[0], scale, gqa).reshape(-1, num_heads, head_dim)
    out = torch.empty_like(query)
    for group in groups:
        out[group.token_index] = _attend(query, kv_cache, layer, group, scale, gqa).reshape(
            -1, num_heads, head_dim
        )
    return out


def _attend(
    query: torch.Tensor,
    kv_cache: KVCache,
    layer: int,
    group: AttentionGroup,
    scale: float,
    gqa: bool,
) -> torch.Tensor:
    keys, values = kv_cache.gather(layer, group.context_slots)  # [batch, ctx, kv_heads, dim]
    q = query[group.query_index].transpose(1, 2)  # [batch, heads, num_queries, dim]
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [batch, kv_heads, ctx, dim]
    if gqa and group.mask is not None and q.is_cuda:
        # CUDA's fused SDPA kernels take either a mask or enable_gqa, not both (the pair falls back to
        # the math kernel): repeat the KV heads instead.
        repeat = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(repeat, dim=1), values.repeat_interleave(repeat, dim=1)
        gqa = False
    out = F.scaled_dot_product_attention(
        q,
        keys,
        values,
        attn_mask=group.mask,
        is_causal=group.mask is None and q.shape[2] > 1,
        scale=scale,
        enable_gqa=gqa,
    )
    return out.transpose(1, 2)  # [batch, num_queries, heads, dim]

