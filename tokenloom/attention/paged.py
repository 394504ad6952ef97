"""Attention over the paged KV cache with torch's SDPA (L1t). Any mix of prefill chunks and decode
tokens shares one flat batch: decode tokens (one query each) are attended in one batched call, and
each prefill chunk in a call of its own, so no query is padded to another sequence's length.

Sliding-window layers (transformers' convention: a query at position p attends keys at positions k
with p - window < k <= p) gather only their window's slots; their groups are built on first use and
cached on the step's AttentionMetadata, once per window size, for every layer that shares it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from tokenloom.cache.kv_cache import KVCache


@dataclass
class AttentionGroup:
    """Sequences attended in one SDPA call.

    query_index: [batch, num_queries] flat token index of each query.
    token_index: [batch * num_queries] where each output row goes in the flat batch.
    context_slots: [batch, num_keys] cache slots of each sequence's keys (padding and freed blocks
        point at some slot of the pool and are masked); None when context_blocks is given.
    mask: [batch, 1, num_queries, num_keys], True where a query may attend a key; None when the
        group is one chunk computed from position 0 that no window cuts, which is plain causal
        attention.
    context_blocks: [batch, num_blocks] the blocks holding each sequence's keys, read whole (keys
        then number num_blocks * block_size, in block order), instead of context_slots.
    context_range: (start, stop) slots: one sequence whose keys fill these consecutive slots, read as
        a view of the pool (no copy), instead of both.
    padding: the last `padding` queries repeat the chunk's last query (see QUERY_QUANTUM); their
        outputs are dropped. The keys may be padded likewise (the last key's slot again, masked).
    """

    query_index: torch.Tensor
    token_index: torch.Tensor
    context_slots: torch.Tensor | None
    mask: torch.Tensor | None
    context_blocks: torch.Tensor | None = None
    context_range: tuple[int, int] | None = None
    padding: int = 0


# On the CPU a prefill chunk's queries and keys are each padded to a multiple of this many. SDPA's CPU
# kernel splits a chunk's queries into blocks of 32, 64 or 256 from its first query; its matmuls round
# a block of fewer than 16 rows differently from a wider one (MKL picks its kernel by rows), and a
# block reads keys up to its last query (causal) or all of them, summing them 16 to a vector with a
# shorter tail summed apart. Unpadded, a query's output would depend on where its chunk starts and
# ends: the same prompt token computed cold, after a prefix-cache hit, or chunked otherwise would
# differ in the last bits. Padded, every block has a multiple of 16 rows and reads a multiple of 16
# keys, and each query's output is the same however its prompt was cut.
QUERY_QUANTUM = 16


@dataclass
class AttentionMetadata:
    """Built once per step by the model runner and shared by every layer.

    Only compact data crosses to the device, in one copy (from pinned memory on CUDA): the token ids
    when given, per-sequence query/context lengths, decode rows and the padded block table. Slots,
    positions and masks are computed from it on the device; sizes come from the Python lists, so
    nothing here waits on the device.

    slot_mapping: [num_tokens] cache slot each new token's key/value is written to.
    positions: [num_tokens] position of each new token in its sequence.
    input_ids: [num_tokens] the token ids given to `build` (uploaded in the same copy), else None.
    block_table: [num_seqs, max_blocks] on the device, each row padded with its own last entry.
    query_lens / context_lens / block_tables: the step, per sequence (query_lens[i] new tokens end
        at position context_lens[i] - 1; block_tables[i][b] holds positions b * block_size onwards,
        a negative entry marks a block freed because no layer's window reaches it any more: its
        positions are outside every window that reads them and are masked, never gathered).
    """

    slot_mapping: torch.Tensor
    positions: torch.Tensor
    input_ids: torch.Tensor | None
    block_table: torch.Tensor
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    block_size: int
    device: torch.device
    _context_lens: torch.Tensor = field(repr=False)  # [num_seqs] on the device
    _decode: list[int] = field(repr=False)  # rows with one query
    _decode_rows: torch.Tensor | None = field(repr=False)  # [num_decode]; None when every row decodes
    _decode_tokens: torch.Tensor | None = field(repr=False)  # [num_decode] their flat token index
    _groups: dict[int | None, list[AttentionGroup]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
        input_ids: list[int] | None = None,
    ) -> AttentionMetadata:
        """query_lens[i] new tokens of sequence i end at position context_lens[i] - 1. `input_ids`
        (the step's flat token ids) ride along in the same host-to-device copy."""
        num_seqs, num_tokens = len(query_lens), sum(query_lens)
        decode = [i for i, q in enumerate(query_lens) if q == 1]
        all_decode = len(decode) == num_seqs
        decode_lists: list[list[int]] = []
        if not all_decode:
            token_starts = list(itertools.accumulate(query_lens, initial=0))
            decode_lists = [decode, [token_starts[i] for i in decode]]
        widths = [len(table) for table in block_tables]
        max_blocks = max(widths)
        uniform = min(widths) == max_blocks
        ids = input_ids if input_ids is not None else []
        parts = [ids, query_lens, context_lens, *decode_lists, [] if uniform else widths]
        sizes = [len(part) for part in parts] + [sum(widths)]
        # one host buffer -> one copy; int32 halves the bytes sent to an accelerator
        host = np.fromiter(
            itertools.chain(*parts, itertools.chain.from_iterable(block_tables)),
            dtype=np.int64 if device.type == "cpu" else np.int32,
            count=sum(sizes),
        )
        packed = torch.from_numpy(host)
        if device.type == "cuda":
            packed = packed.pin_memory().to(device, non_blocking=True)
        packed = packed.to(device=device, dtype=torch.long)
        pieces = list(packed.split(sizes))
        ids_t, query_t, context_t = pieces[:3]
        decode_rows, decode_tokens = (pieces[3], pieces[4]) if decode_lists else (None, None)
        flat_tables = pieces[-1]
        if uniform:
            block_table = flat_tables.view(num_seqs, max_blocks)
        else:  # pad each row with its last entry: [num_seqs, max_blocks]
            widths_t = pieces[-2]
            row_starts = widths_t.cumsum(0) - widths_t
            column = torch.minimum(torch.arange(max_blocks, device=device)[None, :], widths_t[:, None] - 1)
            block_table = flat_tables[row_starts[:, None] + column]
        if all_decode:
            rows = torch.arange(num_seqs, device=device)
            positions = context_t - 1
        else:
            rows = torch.repeat_interleave(
                torch.arange(num_seqs, device=device), query_t, output_size=num_tokens
            )  # [num_tokens] each token's sequence
            positions = torch.arange(num_tokens, device=device) + (context_t - query_t.cumsum(0))[rows]
        slot_mapping = block_table[rows, positions // block_size] * block_size + positions % block_size
        return cls(
            slot_mapping=slot_mapping,
            positions=positions,
            input_ids=ids_t if input_ids is not None else None,
            block_table=block_table,
            query_lens=list(query_lens),
            context_lens=list(context_lens),
            block_tables=block_tables,
            block_size=block_size,
            device=device,
            _context_lens=context_t,
            _decode=decode,
            _decode_rows=decode_rows,
            _decode_tokens=decode_tokens,
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
        device, block_size = self.device, self.block_size
        groups = []
        if self._decode:
            key_lens = [min(self.context_lens[i], window) if window else self.context_lens[i] for i in self._decode]
            width = max(key_lens)
            if self._decode_rows is None:  # every row decodes
                tables, ends = self.block_table, self._context_lens
                token_index = torch.arange(len(self._decode), device=device)
            else:
                tables, ends = self.block_table[self._decode_rows], self._context_lens[self._decode_rows]
                token_index = self._decode_tokens
            key_pos = torch.arange(width, device=device)  # left-aligned keys: [width] or [num_decode, width]
            if window:
                key_pos = (ends - window).clamp_(min=0)[:, None] + key_pos
                slots = _row_slots(tables, key_pos, block_size)
            else:
                slots = _range_slots(tables, 0, width, block_size)
            mask = None
            if min(key_lens) != width:  # every key lies in the window and at or before the query otherwise
                mask = (key_pos < ends[:, None])[:, None, None, :]
            groups.append(
                AttentionGroup(
                    query_index=token_index[:, None],
                    token_index=token_index,
                    context_slots=slots,
                    mask=mask,
                )
            )
        token_start = 0
        for i, (q, ctx) in enumerate(zip(self.query_lens, self.context_lens)):
            token_start += q
            if q == 1:
                continue
            first_query = ctx - q
            first_key = max(0, first_query - window + 1) if window else 0
            token_index = torch.arange(token_start - q, token_start, device=device)
            slots = _range_slots(self.block_table[i : i + 1], first_key, ctx, block_size)
            padding = key_padding = 0
            query_index = token_index
            if device.type == "cpu":  # see QUERY_QUANTUM
                padding, key_padding = -q % QUERY_QUANTUM, -(ctx - first_key) % QUERY_QUANTUM
                if padding:
                    query_index = torch.cat([token_index, token_index[-1:].expand(padding)])
                if key_padding:  # the last key again, never attended by a real query
                    slots = torch.cat([slots, slots[:, -1:].expand(1, key_padding)], dim=1)
            mask = None
            if first_query != 0 or (window is not None and q > window):
                key_pos = torch.arange(first_key, ctx + key_padding, device=device)
                query_pos = torch.arange(first_query, ctx + padding, device=device).clamp_(max=ctx - 1)[:, None]
                allowed = key_pos[None, :] <= query_pos
                if window is not None:
                    allowed &= key_pos[None, :] > query_pos - window
                mask = allowed[None, None]
            # Without a mask (SDPA's causal mask, aligned to the first query and key) the padded keys
            # lie after every real query and the padded queries after every real key: the chunk's
            # own rows attend what they would unpadded.
            groups.append(
                AttentionGroup(
                    query_index=query_index[None, :],
                    token_index=token_index,
                    context_slots=slots,
                    mask=mask,
                    padding=padding,
                )
            )
        return groups


def _range_slots(tables: torch.Tensor, first: int, end: int, block_size: int) -> torch.Tensor:
    """Cache slots of positions first .. end - 1 of every row of block tables [rows, max_blocks];
    returns [rows, end - first]. Only the blocks the range touches are read; freed (negative)
    entries map into block 0 and a shorter row's positions into its padding: the caller masks both."""
    first_block = first // block_size
    base = tables[:, first_block : -(-end // block_size)].clamp(min=0) * block_size  # [rows, blocks]
    offsets = torch.arange(block_size, device=tables.device)
    slots = (base[:, :, None] + offsets).reshape(tables.shape[0], -1)
    shift = first - first_block * block_size
    return slots[:, shift : shift + end - first]


def _row_slots(tables: torch.Tensor, key_pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slots of positions key_pos [rows, num_keys] through block tables [rows, max_blocks];
    returns [rows, num_keys]. Freed entries and positions past a row's table are masked by the caller."""
    base = tables.clamp(min=0) * block_size  # [rows, max_blocks], small
    column = (key_pos // block_size).clamp_(max=tables.shape[1] - 1)
    return base.gather(1, column).add_(key_pos % block_size)


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
    if group.context_range is not None:  # one sequence whose keys lie in consecutive slots: no copy
        start, stop = group.context_range
        keys, values = kv_cache.keys[layer][None, start:stop], kv_cache.values[layer][None, start:stop]
    elif group.context_blocks is not None:
        keys, values = kv_cache.gather_blocks(layer, group.context_blocks)  # [batch, ctx, kv_heads, dim]
    else:
        keys, values = kv_cache.gather(layer, group.context_slots)
    if group.query_index.shape[1] == 1 and not query.is_cuda:
        return _attend_one_query(query[group.query_index[:, 0]], keys, values, group.mask, scale)[:, None]
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
    if group.padding:
        out = out[:, :, : out.shape[2] - group.padding]
    return out.transpose(1, 2)  # [batch, num_queries, heads, dim]


def _attend_one_query(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Decode attention, one query per row, as two batched matmuls: query [batch, heads, dim], keys /
    values [batch, ctx, kv_heads, dim] (any strides), mask [batch, 1, 1, ctx] or None; returns
    [batch, heads, dim]. On the CPU SDPA's fused kernel parallelises over queries and is several
    times slower than this for one query over a long context (7 ms against 0.8 ms at 4k keys)."""
    batch, num_heads, head_dim = query.shape
    num_kv_heads = keys.shape[2]
    q = query.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)  # query heads grouped by KV head
    scores = torch.matmul(q, keys.permute(0, 2, 3, 1)) * scale  # [batch, kv_heads, group, ctx]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(values.dtype)
    out = torch.matmul(probs, values.transpose(1, 2))  # [batch, kv_heads, group, dim]
    return out.reshape(batch, num_heads, head_dim)
