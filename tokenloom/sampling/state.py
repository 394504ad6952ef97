"""Sampling state kept across steps (L1t): per-request token histories for the history-based
processors and the batch's per-row parameter tensors, so that a step's SamplingBatch costs O(new
tokens) rather than O(history). Owned by the model runner; `release` forgets a request."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tokenloom.sampling.processors import GrowingTensor, RowHistory, RowValues, TokenPairs
from tokenloom.sampling_params import SamplingParams


class RowSettings:
    """The per-row tensors that depend on the parameters only (not on the tokens)."""

    def __init__(self, warpers: dict[str, Any], frequency_penalty: torch.Tensor | None,
                 presence_penalty: torch.Tensor | None) -> None:
        self.warpers = warpers
        self.frequency_penalty = frequency_penalty
        self.presence_penalty = presence_penalty


def row_settings(
    params: list[SamplingParams], generators: list[torch.Generator | None], device: torch.device
) -> RowSettings:
    greedy = [p.is_greedy for p in params]

    def warper(values: list[Any], neutral: Any, dtype: torch.dtype) -> RowValues | None:
        active = [row for row, (v, g) in enumerate(zip(values, greedy)) if not g and v != neutral]
        if not active:
            return None
        rows = None if len(active) == len(values) else torch.tensor(active, dtype=torch.long, device=device)
        return RowValues(torch.tensor([values[row] for row in active], dtype=dtype, device=device), rows)

    f32 = torch.float32
    renormalize = [p.renormalize_logits for p in params]
    sample_rows = [row for row, g in enumerate(generators) if g is not None]
    penalized = any(p.presence_penalty or p.frequency_penalty for p in params)
    warpers = dict(
        all_greedy=all(greedy),
        temperature=warper([p.temperature for p in params], 1.0, f32),
        top_k=warper([p.top_k for p in params], 0, torch.long),
        max_top_k=max((p.top_k for p, g in zip(params, greedy) if not g), default=0),
        top_p=warper([p.top_p for p in params], 1.0, wide_float(device)),
        min_p=warper([p.min_p for p in params], 0.0, f32),
        typical_p=warper([p.typical_p for p in params], 1.0, f32),
        epsilon_cutoff=warper([p.epsilon_cutoff for p in params], 0.0, f32),
        eta_cutoff=warper([p.eta_cutoff for p in params], 0.0, f32),
        renormalize=torch.tensor(renormalize, device=device) if any(renormalize) and not all(renormalize) else None,
        all_renormalize=bool(renormalize) and all(renormalize),
        sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=device) if sample_rows else None,
    )
    return RowSettings(
        warpers,
        torch.tensor([p.frequency_penalty for p in params], dtype=f32, device=device) if penalized else None,
        torch.tensor([p.presence_penalty for p in params], dtype=f32, device=device) if penalized else None,
    )


def settings_key(params: list[SamplingParams], generators: list[torch.Generator | None]) -> tuple:
    return tuple(
        (p.is_greedy, p.temperature, p.top_k, p.top_p, p.min_p, p.typical_p, p.epsilon_cutoff, p.eta_cutoff,
         p.renormalize_logits, p.presence_penalty, p.frequency_penalty, g is not None)
        for p, g in zip(params, generators)
    )


def in_vocab(vocab_size: int | None):
    return (lambda t: True) if vocab_size is None else (lambda t: t < vocab_size)


def concat_pairs(
    pairs: TokenPairs | None, parts: list[tuple[int, torch.Tensor, Any]], device: torch.device
) -> TokenPairs:
    """TokenPairs from per-row device id lists (and per-row values: a float for the whole row, or a
    tensor aligned with the ids), plus the pairs already collected for other rows."""
    lengths = [ids.numel() for _, ids, _ in parts]
    total = sum(lengths)
    meta = torch.tensor([[row for row, _, _ in parts], lengths], dtype=torch.long).to(device)  # [2, parts]
    rows = meta[0].repeat_interleave(meta[1], output_size=total)
    tokens = torch.cat([ids for _, ids, _ in parts])
    if isinstance(parts[0][2], torch.Tensor):
        values = torch.cat([v for _, _, v in parts])
    else:
        per_row = torch.tensor([v for _, _, v in parts], dtype=torch.float32).to(device)
        values = per_row.repeat_interleave(meta[1], output_size=total)
    if pairs is not None:
        rows, tokens = torch.cat([pairs.rows, rows]), torch.cat([pairs.tokens, tokens])
        values = torch.cat([pairs.values, values])
    return TokenPairs(rows, tokens, values)


class RepetitionPairs:
    """The batch's repetition-penalty pairs, appended to while the batch holds the same requests in
    the same rows, so a step adds only its new ids. Rebuilt from the rows' (mostly sorted) histories
    when the rows change or once a quarter of the pairs are appended ones (in first-seen order)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.key: tuple | None = None  # None until the first rebuild
        self.rows = GrowingTensor(torch.long, device)
        self.tokens = GrowingTensor(torch.long, device)
        self.values = GrowingTensor(torch.float32, device)
        self.included: list[int] = []  # per part: how many of its history's seen ids are in
        self.num_rebuilt = 0

    def pairs(self, key: tuple, parts: list[tuple[int, RowHistory, float]]) -> TokenPairs:
        if key != self.key or self.rows.size - self.num_rebuilt > max(self.num_rebuilt // 4, 4096):
            self._rebuild(key, parts)
        else:
            rows: list[int] = []
            tokens: list[int] = []
            values: list[float] = []
            for i, (row, history, penalty) in enumerate(parts):
                fresh = history.seen_order[self.included[i] :]
                if fresh:
                    rows.extend([row] * len(fresh))
                    tokens.extend(fresh)
                    values.extend([penalty] * len(fresh))
                    self.included[i] = len(history.seen_order)
            self.rows.extend(rows)
            self.tokens.extend(tokens)
            self.values.extend(values)
        return TokenPairs(self.rows.view(), self.tokens.view(), self.values.view())

    def _rebuild(self, key: tuple, parts: list[tuple[int, RowHistory, float]]) -> None:
        fresh = concat_pairs(None, [(row, h.sorted_seen_ids(), penalty) for row, h, penalty in parts], self.device)
        self.key, self.included = key, [len(h.seen_order) for _, h, _ in parts]
        self.rows, self.tokens = GrowingTensor(torch.long, self.device), GrowingTensor(torch.long, self.device)
        self.values = GrowingTensor(torch.float32, self.device)
        for buffer, data in ((self.rows, fresh.rows), (self.tokens, fresh.tokens), (self.values, fresh.values)):
            buffer.data = torch.empty(data.numel() * 5 // 4 + 64, dtype=data.dtype, device=self.device)
            buffer.data[: data.numel()] = data
            buffer.size = data.numel()
        self.num_rebuilt = self.rows.size


class SamplingState:
    """Per-request sampling state kept across steps by the model runner: each request's
    `RowHistory` (keyed by request id, never shared) and the last batch's per-row parameter
    tensors (reused while every row's settings are the same). `release` drops a request's state."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._histories: dict[str, RowHistory] = {}
        self.settings_key: tuple | None = None
        self._settings: RowSettings | None = None
        self._repetition = RepetitionPairs(device)

    def histories(
        self,
        request_ids: Sequence[str] | None,
        params: list[SamplingParams],
        token_ids: Sequence[Sequence[int]],
        num_prompt_tokens: Sequence[int],
    ) -> list[RowHistory | None]:
        if request_ids is None or len(request_ids) != len(params):
            raise ValueError("SamplingBatch.build with a state needs one request id per row")
        result: list[RowHistory | None] = []
        for request_id, p, ids, num_prompt in zip(request_ids, params, token_ids, num_prompt_tokens):
            if not RowHistory.is_needed(p):
                result.append(None)
                continue
            history = self._histories.get(request_id)
            if history is None or not history.follows(p, ids, num_prompt):  # type: ignore[arg-type]
                history = self._histories[request_id] = RowHistory(p, ids, num_prompt, self.device)  # type: ignore[arg-type]
            history.sync()
            result.append(history)
        return result

    def row_settings(self, params: list[SamplingParams], generators: list[torch.Generator | None]) -> RowSettings:
        key = settings_key(params, generators)
        if key != self.settings_key or self._settings is None:
            self.settings_key, self._settings = key, row_settings(params, generators, self.device)
        return self._settings

    def repetition_pairs(
        self, request_ids: Sequence[str], parts: list[tuple[int, torch.Tensor, float]], histories: list
    ) -> TokenPairs:
        """The repetition-penalty pairs of the rows in `parts` (row, seen ids, penalty)."""
        with_history = [(row, histories[row], penalty) for row, _, penalty in parts]
        key = tuple((row, request_ids[row], history.serial, penalty) for row, history, penalty in with_history)
        return self._repetition.pairs(key, with_history)

    def release(self, request_id: str) -> None:
        self._histories.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._histories


def wide_float(device: torch.device) -> torch.dtype:
    return torch.float32 if torch.device(device).type == "mps" else torch.float64  # MPS has no float64
