"""The engine every face submits to: add_request / abort / step (L5)."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from tokenloom.cache.block_manager import BlockManager
from tokenloom.cache.kv_cache import KVCache
from tokenloom.config import EngineConfig
from tokenloom.engine.memory import MemoryUsage, kv_budget_bytes, module_bytes, peak_bytes
from tokenloom.engine.model_runner import ModelRunner, StepResult
from tokenloom.engine.requests import (
    PreparedRequest,
    RequestFailedError,
    cache_namespace,
    check_param_ids,
    checked_ids,
    checked_stop,
    raise_if_failed,
    request_metrics,
    row_extra,
)
from tokenloom.engine.scheduler import Scheduler, SchedulerOutput
from tokenloom.engine.sequence import FinishReason, Sequence, SequenceStatus
from tokenloom.engine.speculator import SpeculativeStats, Speculator, push_until_stop
from tokenloom.models.base import CausalLM
from tokenloom.outputs import RequestOutput, TokenIdsSlice
from tokenloom.sampling.grammar import compile_grammar
from tokenloom.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenloom.detokenizer import IncrementalDetokenizer
    from tokenloom.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class Engine:
    """Owns the model, the KV cache, the scheduler and the runner. Not thread-safe: one thread
    (the caller's, or the server's engine loop) drives it."""

    def __init__(
        self,
        model: CausalLM,
        config: EngineConfig | None = None,
        tokenizer: Tokenizer | None = None,
        draft_model: CausalLM | None = None,
    ) -> None:
        """draft_model: the proposer of speculative decoding's "draft_model" method (same vocabulary)."""
        self.config = config or EngineConfig()
        self.model = model
        self.tokenizer = tokenizer
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype if param.is_floating_point() else torch.float32
        mc = model.config
        self.max_model_len = self.config.max_model_len or mc.max_position_embeddings
        block_size = self.config.block_size
        num_blocks = self.config.num_kv_blocks or self._blocks_for_budget(block_size)
        self.kv_cache = KVCache(
            mc.num_hidden_layers, num_blocks, block_size, mc.num_key_value_heads, mc.head_dim,
            self.dtype, self.device,
        )
        self.block_manager = BlockManager(
            num_blocks, block_size, enable_prefix_caching=self.config.enable_prefix_caching,
            cache_namespace=cache_namespace(model, self.dtype, self.device),
        )
        self.scheduler = Scheduler(
            self.block_manager, self.config.max_num_seqs, self.config.max_num_batched_tokens,
            kv_window=mc.kv_window,
        )
        self.runner = ModelRunner(
            model, self.kv_cache, self.device, compile=self.config.compile,
            compile_after=self.config.compile_after, max_num_seqs=self.config.max_num_seqs,
        )
        self._sequences: dict[str, Sequence] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._mailbox: dict[str, list[RequestOutput]] = {}  # outputs awaiting their own stream()
        self._counter = itertools.count()
        self.speculator = Speculator(self.config.speculative)
        if draft_model is not None:
            self.set_draft_model(draft_model)

    def set_draft_model(self, draft_model: CausalLM | None) -> None:
        """The model that proposes tokens for requests speculating with method "draft_model" (None:
        none). Its KV pool holds as many tokens as the engine's. Refused while requests are queued
        (their draft caches would be lost) and for a model with another vocabulary size."""
        self.speculator.set_draft_model(
            draft_model, self.has_unfinished(), self.model.config.vocab_size, self.kv_cache.num_blocks,
            self.config.block_size, self.max_model_len,
        )

    @property
    def speculative_stats(self) -> SpeculativeStats:
        """Proposed and accepted token counts of speculative decoding so far."""
        return self.speculator.stats

    def _blocks_for_budget(self, block_size: int) -> int:
        """Blocks the KV budget (EngineConfig.kv_cache_memory) pays for, and never more than
        max_num_seqs full-length sequences could use."""
        mc = self.model.config
        per_block = KVCache.bytes_per_block(
            mc.num_hidden_layers, block_size, mc.num_key_value_heads, mc.head_dim, self.dtype
        )
        budget = kv_budget_bytes(self.config.kv_cache_memory, self.device)
        most_useful = self.config.max_num_seqs * -(-self.max_model_len // block_size)
        return max(1, min(budget // per_block, most_useful))

    def memory_usage(self) -> MemoryUsage:
        """Bytes held by the weights and the KV pool, and the process's peak so far."""
        return MemoryUsage(
            weights=module_bytes(self.model),
            kv_cache=self.kv_cache.nbytes,
            num_kv_blocks=self.kv_cache.num_blocks,
            peak=peak_bytes(self.device),
            device=self.device.type,
        )

    # ---- requests -------------------------------------------------------------------------
    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        detokenize: bool = True,
    ) -> str:
        """Queue a request; returns its id. Sampling requests without a seed get one drawn from
        torch's global generator, so `torch.manual_seed`/`set_seed` make runs repeatable.
        Requests with stop strings (`params.stop`) need the engine's tokenizer, even when
        `detokenize` is False: the strings are matched on the detokenized output."""
        return self.enqueue(self.prepare_request(prompt_token_ids, params, request_id, detokenize))

    def prepare_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        detokenize: bool = True,
    ) -> PreparedRequest:
        """Every check a request needs, without touching the engine's state, so any thread may run it
        (a server handler refuses a bad request here, before it reaches the engine loop): vocabulary,
        context length and KV capacity, stop strings, the seed and the detokenizer. Raises ValueError
        naming the problem."""
        index = next(self._counter)  # itertools.count: atomic under the GIL
        request_id = request_id if request_id is not None else f"req-{index}"
        prompt = self.checked_ids("prompt token ids", prompt_token_ids)
        self.check_param_ids(params)
        self.speculator.check(params)
        stop = checked_stop(self.tokenizer, params)
        if not prompt:
            raise ValueError("the prompt must contain at least one token")
        if len(prompt) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt)} tokens; the model's context length is {self.max_model_len}, "
                "which leaves no room to generate"
            )
        if self.scheduler.kv_window is None:
            capacity = self.block_manager.num_blocks * self.block_manager.block_size
            if len(prompt) + 1 > capacity:
                raise ValueError(
                    f"request {request_id!r}: prompt of {len(prompt)} tokens cannot fit the KV cache of "
                    f"{capacity} tokens; raise num_kv_blocks or shorten the prompt"
                )
        seq = Sequence(request_id, prompt, params, index, max_total_tokens=self.max_model_len)
        if params.structured is not None:  # compiled here, so an invalid grammar is refused before it is queued
            seq.grammar = compile_grammar(params, self.tokenizer, self.model.config.vocab_size)
        seed = None
        if not params.is_greedy:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        detokenizer = None
        if (detokenize or stop) and self.tokenizer is not None:
            from tokenloom.detokenizer import IncrementalDetokenizer

            detokenizer = IncrementalDetokenizer(
                self.tokenizer, prompt, skip_special_tokens=params.skip_special_tokens, stop=stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
            )
        return PreparedRequest(request_id, seq, seed, detokenizer)

    def enqueue(self, prepared: PreparedRequest) -> str:
        """Queue a prepared request; only the thread that steps the engine may call this. Raises
        ValueError when its id is already in use (nothing is queued then)."""
        request_id, seq = prepared.request_id, prepared.seq
        if request_id in self._sequences:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if seq.status is not SequenceStatus.WAITING or seq.num_computed_tokens or seq.block_ids:
            raise ValueError(f"request {request_id!r} was already queued once; prepare it again")
        if prepared.seed is not None:
            self.runner.register_seed(request_id, prepared.seed)
            self.speculator.register_seed(request_id, prepared.seed)
        if prepared.detokenizer is not None:
            self._detokenizers[request_id] = prepared.detokenizer
        try:
            self.scheduler.add(seq)
        except BaseException:
            self._release(seq)
            raise
        self._sequences[request_id] = seq
        return request_id

    def checked_ids(self, what: str, ids: list[int]) -> list[int]:
        """`ids` as ints, or a ValueError naming `what` when one lies outside the vocabulary."""
        return checked_ids(self.model.config.vocab_size, what, ids)

    def check_param_ids(self, params: SamplingParams) -> None:
        """Every token id a request's parameters name must exist in this model's vocabulary."""
        check_param_ids(self.model.config.vocab_size, params)

    def abort(self, request_id: str) -> None:
        seq = self.scheduler.abort(request_id)
        self._mailbox.pop(request_id, None)
        if seq is not None:
            self._release(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_unfinished(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)

    # ---- stepping -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, and report every request that changed.

        A step that raises fails only the requests it touched: each is finished with finish_reason
        "error" (its output carries the message, its blocks go back to the pool) and the engine goes on
        serving the others. `stream` and `run` raise RequestFailedError for such an output."""
        running = list(self.scheduler.running)
        try:
            self.speculator.propose(running)
        except Exception as exc:
            return self._fail(running, exc)
        out: SchedulerOutput = self.scheduler.schedule()
        if out.is_empty:
            if self.scheduler.waiting:
                raise RuntimeError("the scheduler could not place any waiting request in the KV cache")
            return []
        now = time.monotonic()
        for item in out.scheduled:
            if item.seq.first_scheduled_time is None:
                item.seq.first_scheduled_time = now
        # Which runner row belongs to which request, taken before update() advances the sequences.
        rows = {item.seq.request_id: row for row, item in enumerate(i for i in out.scheduled if i.samples)}
        lengths = {item.seq.request_id: item.seq.num_tokens for item in out.scheduled}
        try:
            draft_probs = self.speculator.draft_probs
            result = self.runner.step(out, draft_probs) if draft_probs else self.runner.step(out)
            self.speculator.record(out, result.sampled_token_ids)
            touched = self.scheduler.update(out, result.sampled_token_ids)
        except Exception as exc:
            return self._fail([item.seq for item in out.scheduled], exc)
        outputs = []
        try:
            for seq in touched:
                try:
                    new_ids = seq.token_ids[lengths[seq.request_id] :]
                    outputs.append(self._output(seq, new_ids, result, rows[seq.request_id]))
                except Exception as exc:
                    outputs.extend(self._fail([seq], exc))
        finally:  # even if an output fails, finished requests give back their per-request state
            for seq in touched:
                if seq.is_finished:
                    self._release(seq)
        return outputs

    def _fail(self, seqs: list[Sequence], exc: Exception) -> list[RequestOutput]:
        """Finish `seqs` with "error" after a step raised on them: blocks freed, state released."""
        logger.error(
            "a step failed for %d request(s) (%s): %s: %s", len(seqs),
            ", ".join(s.request_id for s in seqs[:8]), type(exc).__name__, exc, exc_info=exc,
        )
        message = f"{type(exc).__name__}: {exc}"
        outputs = []
        for seq in seqs:
            if seq.request_id not in self._sequences:
                continue  # already finished and reported
            self.scheduler.finish(seq, FinishReason.ERROR)
            self._release(seq)
            outputs.append(RequestOutput(
                request_id=seq.request_id,
                prompt_token_ids=seq.prompt_token_ids,
                token_ids=seq.output_token_ids,
                finished=True,
                finish_reason=FinishReason.ERROR.value,
                error=message,
                exception=exc,
                metrics=request_metrics(seq),
            ))
        return outputs

    def run(self) -> Iterator[RequestOutput]:
        """Step until every queued request has finished, yielding each output."""
        while self.has_unfinished():
            for out in self.step():
                raise_if_failed(out)
                yield out

    def add_requests(
        self, requests: list[tuple[list[int], SamplingParams]], detokenize: bool = True
    ) -> list[str]:
        """Queue several requests, all or none: if one is rejected, those already queued are aborted."""
        added: list[str] = []
        try:
            for prompt, params in requests:
                added.append(self.add_request(prompt, params, detokenize=detokenize))
        except BaseException:
            for request_id in added:
                self.abort(request_id)
            raise
        return added

    def stream(self, request_ids: list[str]) -> Iterator[RequestOutput]:
        """Step until the given requests finish, yielding their outputs. Outputs of other requests
        produced meanwhile are kept for their own `stream` call. Closing the iterator early (or an
        error while stepping) aborts the given requests that have not finished."""
        pending = set(request_ids)
        try:
            while pending:
                ready = [r for r in request_ids if r in pending and r in self._mailbox]
                for request_id in ready:
                    for out in self._mailbox.pop(request_id):
                        if out.finished:
                            pending.discard(request_id)
                        raise_if_failed(out)
                        yield out
                # A request aborted by another caller: its consumer still learns that it ended.
                for request_id in [r for r in request_ids if r in pending]:
                    if request_id not in self._sequences and request_id not in self._mailbox:
                        pending.discard(request_id)
                        yield RequestOutput(request_id, [], finished=True, finish_reason=FinishReason.ABORT.value)
                if not pending:
                    break
                if not self.has_unfinished():
                    continue
                # Every output of the step is filed before any is yielded, so another consumer
                # resuming in between finds its own.
                for out in self.step():
                    self._mailbox.setdefault(out.request_id, []).append(out)
        finally:
            for request_id in pending:
                self.abort(request_id)

    def _output(self, seq: Sequence, new_ids: list[int], result: StepResult, row: int) -> RequestOutput:
        """Detokenize the new tokens, finish the sequence when they complete a stop string, and
        report them with the runner's per-row extras."""
        detok = self._detokenizers.get(seq.request_id)
        delta = ""
        stop_reason: str | int | None = None
        if detok is not None:
            delta, new_ids = push_until_stop(detok, seq, new_ids)
            if detok.stop_match is not None:
                stop_reason = detok.stop_match
                if seq.is_finished:
                    # The token that hit max_tokens/max_time also completed a stop string: the text
                    # is cut there, so "stop" is the truer reason.
                    seq.finish_reason = FinishReason.STOP
                else:
                    self.scheduler.finish(seq, FinishReason.STOP)
            if seq.is_finished:
                delta += detok.flush()
        if seq.finish_reason is FinishReason.EOS:
            stop_reason = seq.token_ids[-1]
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            new_token_ids=new_ids,
            token_ids=TokenIdsSlice(seq.token_ids, seq.num_prompt_tokens, seq.num_tokens),  # type: ignore[arg-type]
            text_delta=delta,
            text=detok.text if detok is not None else "",
            finished=seq.is_finished,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            stop_reason=stop_reason,
            logprobs=row_extra(result.logprobs, row),
            scores=row_extra(result.scores, row),
            logits=row_extra(result.logits, row),
            metrics=request_metrics(seq) if seq.is_finished else None,
        )

    def _release(self, seq: Sequence) -> None:
        self._sequences.pop(seq.request_id, None)
        self._detokenizers.pop(seq.request_id, None)
        seq.grammar = None
        self.runner.release(seq.request_id)
        self.speculator.release(seq.request_id)

    # ---- scoring --------------------------------------------------------------------------
    def prompt_logits(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Logits [len_i, vocab] for every position of each prompt, through the paged cache.
        Blocks are borrowed from the pool and returned; must not run while requests are queued."""
        from tokenloom.engine.scoring import prompt_logits

        return prompt_logits(self, prompts)


__all__ = ["Engine", "PreparedRequest", "RequestFailedError"]
