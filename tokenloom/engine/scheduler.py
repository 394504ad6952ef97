"""Continuous batching with chunked prefill (L1: pure Python, data in, data out)."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field

from tokenloom.cache.block_manager import BlockManager
from tokenloom.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int  # tokens computed for this sequence in this step (proposed ones included)
    # speculative decoding: proposed tokens computed after the sequence's last one (the last
    # len(spec_token_ids) of num_new_tokens) and verified in this step
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """True when this step computes the sequence's last known token, so a new one is sampled."""
        num_known = self.num_new_tokens - len(self.spec_token_ids)
        return self.seq.num_computed_tokens + num_known == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Each step: running sequences first (oldest first), then waiting ones while blocks and the
    token budget last. A long prompt is computed in chunks. When blocks run out the newest running
    sequence is preempted: its blocks are freed and it is recomputed later from its tokens.

    kv_window: when every layer of the model attends at most this many positions, blocks behind
    each sequence's window go back to the pool after every step, a prompt chunk shrinks to the
    blocks left, and a sequence is bounded by its context length rather than by the pool."""

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        kv_window: int | None = None,
    ) -> None:
        if kv_window is not None and kv_window < 1:
            raise ValueError(f"kv_window must be a positive number of positions or None, got {kv_window}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.kv_window = kv_window
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if self.kv_window is not None:
            # One token's step needs the blocks of its window: `kv_window` positions at any offset.
            block_size = self.block_manager.block_size
            needed = -(-(self.kv_window - 1) // block_size) + 1
            if self.block_manager.num_blocks < needed:
                raise ValueError(
                    f"request {seq.request_id!r}: the KV cache has {self.block_manager.num_blocks} blocks; "
                    f"the model's sliding window of {self.kv_window} positions needs at least {needed} "
                    f"blocks of {block_size}; raise num_kv_blocks"
                )
            self.waiting.append(seq)
            return
        if seq.num_prompt_tokens + 1 > capacity:
            raise ValueError(
                f"request {seq.request_id!r}: prompt of {seq.num_prompt_tokens} tokens cannot fit the KV "
                f"cache of {capacity} tokens; raise num_kv_blocks or shorten the prompt"
            )
        # A sequence may never outgrow the whole pool: it finishes with "length" there.
        seq.max_total_tokens = min(seq.max_total_tokens or capacity, capacity)
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.running, self.waiting):
            for seq in list(queue):
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._finish(seq, FinishReason.ABORT)
                    return seq
        return None

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Finish `seq` now for a reason only the engine can see (a stop string in the text): it
        leaves the queues and its blocks return to the pool. A finished sequence is left alone."""
        if seq.is_finished:
            return
        # By identity: Sequence is a dataclass, so `in`/remove would compare field by field.
        for queue in (self.running, self.waiting):
            for index, queued in enumerate(queue):
                if queued is seq:
                    del queue[index]
                    break
        self._finish(seq, reason)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.can_allocate(seq, self._fit(seq, num_new)):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            num_new = self._fit(seq, num_new)
            spec = self._spec_tokens(seq, num_new, budget)
            self.block_manager.allocate(seq, num_new + len(spec))
            out.scheduled.append(ScheduledSequence(seq, num_new + len(spec), spec))
            budget -= num_new + len(spec)
            index += 1

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            num_cached = self.block_manager.match_prefix(seq)
            num_new = self._fit(seq, min(seq.num_tokens - seq.num_computed_tokens, budget))
            if not self.block_manager.can_allocate(seq, num_new):
                if num_cached:  # give the cached blocks back; the next step looks again
                    self.block_manager.free(seq)
                    seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            self.block_manager.record_lookup(seq.num_tokens, num_cached)
            if seq.num_output_tokens == 0:
                seq.num_cached_tokens = num_cached
            self.block_manager.allocate(seq, num_new)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        return out

    def update(self, out: SchedulerOutput, sampled_token_ids: SequenceOf[int | list[int]]) -> list[Sequence]:
        """Record a step: advance computed counts, append sampled tokens (one per sampling
        sequence, in scheduled order; a speculating sequence gets a list: its accepted proposed
        tokens, then the one the target chose), finish sequences that must stop. Tokens after a
        stop are dropped, and only accepted tokens count as computed (the KV written at rejected
        positions is overwritten later). Returns the sequences that received a token or finished."""
        touched: list[Sequence] = []
        sampled = iter(sampled_token_ids)
        for item in out.scheduled:
            seq = item.seq
            samples = item.samples
            new = next(sampled) if samples else []
            tokens = [new] if isinstance(new, int) else list(new)
            num_accepted = max(0, len(tokens) - 1)  # proposed tokens the target kept: their KV is valid
            seq.num_computed_tokens += item.num_new_tokens - len(item.spec_token_ids) + num_accepted
            seq.spec_token_ids = []
            reason = None
            if samples:
                for token in tokens:
                    seq.append_token(token)
                    reason = seq.check_stop()
                    if reason is not None:
                        break  # the rest of an accepted run is dropped
                # the newest token is never computed yet (a stop inside a run leaves fewer)
                seq.num_computed_tokens = min(seq.num_computed_tokens, seq.num_tokens - 1)
            # num_computed_tokens and token_ids are final here: the prefix cache may hash the full blocks
            self.block_manager.commit(seq)
            if self.kv_window is not None:
                # The next query sits at num_computed_tokens and reaches back kv_window - 1 positions.
                self.block_manager.free_blocks_before(seq, seq.num_computed_tokens - self.kv_window + 1)
            if not samples:
                continue
            touched.append(seq)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
        return touched

    def _spec_tokens(self, seq: Sequence, num_new: int, budget: int) -> list[int]:
        """The proposed tokens of a decoding sequence that fit this step: the token budget, the
        context length and the free blocks (speculation never preempts anyone)."""
        proposed = seq.spec_token_ids
        if not proposed or self.kv_window is not None or seq.num_tokens - seq.num_computed_tokens != num_new:
            return []
        room = budget - num_new
        if seq.max_total_tokens is not None:
            room = min(room, seq.max_total_tokens - seq.num_tokens)
        count = max(0, min(len(proposed), room))
        while count and not self.block_manager.can_allocate(seq, num_new + count):
            count -= 1
        return proposed[:count]

    def _fit(self, seq: Sequence, num_new: int) -> int:
        """With a window, a chunk shrinks to what the free blocks hold (its older blocks are freed
        as it advances, so a sequence longer than the pool still makes progress); at least one
        token, so that a sequence finding no room at all preempts or waits."""
        if self.kv_window is None:
            return num_new
        bm = self.block_manager
        room = (len(seq.block_ids) + bm.num_free_blocks) * bm.block_size - seq.num_computed_tokens
        return max(1, min(num_new, room))

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
