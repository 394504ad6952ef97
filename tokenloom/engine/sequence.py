"""A request's state as the scheduler sees it (L1: pure Python)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from tokenloom.sampling_params import SamplingParams

# A block-table entry whose block was returned to the pool because no layer's sliding window reaches
# its positions any more; entries keep their places so block b always holds positions b * block_size on.
FREED_BLOCK = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    EOS = "eos"  # a stop token id (EOS) was generated
    LENGTH = "length"  # max_tokens or the model's context length was reached
    ABORT = "abort"  # the caller aborted the request
    STOP = "stop"  # a stop string appeared in the detokenized output (checked by the engine)
    TIME = "time"  # SamplingParams.max_time elapsed since the request was added
    ERROR = "error"  # a step raised while computing it (the engine went on with the others)


@dataclass
class Sequence:
    """One request: its tokens (prompt, then generated) and how many of them the KV cache holds.

    There are no prefill/decode modes: a step computes `num_tokens - num_computed_tokens` tokens
    (or a chunk of them) and samples one new token once all are computed.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_index: int
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)  # by position; FREED_BLOCK where freed
    num_freed_blocks: int = 0  # leading block_ids entries that are FREED_BLOCK
    # prefix cache: chained hashes of the first full blocks of token_ids (content only, so they
    # survive preemption), and how many of block_ids were offered to the cache (or came from it)
    block_hashes: list[bytes] = field(default_factory=list)
    num_committed_blocks: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache at admission
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    max_total_tokens: int | None = None  # prompt + generated may not exceed this (context length)
    arrival_time: float = field(default_factory=time.monotonic)  # for max_time
    first_scheduled_time: float | None = None  # set by the engine: the end of its queue time
    first_token_time: float | None = None
    # speculative decoding: tokens proposed for the next step, verified there; not part of token_ids
    spec_token_ids: list[int] = field(default_factory=list)
    grammar: Any = None  # structured output: a GrammarMatcher (tokenloom.sampling.grammar), advanced per token

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r}: prompt_token_ids must not be empty")
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if self.grammar is not None:
            self.grammar.accept(token_id)

    def check_stop(self) -> FinishReason | None:
        """Why this sequence must stop after its newest token, or None."""
        params = self.params
        num_output = self.num_output_tokens
        last = self.token_ids[-1]
        if not params.ignore_eos and num_output > params.min_tokens - 1 and last in params.stop_token_ids:
            return FinishReason.EOS
        if self.grammar is not None and self.grammar.is_terminated:
            return FinishReason.STOP  # the grammar is complete: nothing more may follow
        if num_output >= params.max_tokens:
            return FinishReason.LENGTH
        if self.max_total_tokens is not None and self.num_tokens >= self.max_total_tokens:
            return FinishReason.LENGTH
        if params.max_time is not None and time.monotonic() - self.arrival_time > params.max_time:
            return FinishReason.TIME
        return None
