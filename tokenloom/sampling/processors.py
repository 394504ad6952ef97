"""Logits processors and warpers with transformers' semantics, applied per row (L1t).

Each processor is a small function over logits [rows, vocab] and per-row tensors that
`SamplingBatch.build` makes once per step. A row whose knob is neutral is left bit-identical,
and the batch decides in Python (from the parameters, no device sync) which processors run at all.

History-dependent knobs (sequence bias, repetition and presence/frequency penalties, n-gram and
bad-word bans) are resolved in Python from each row's token list into (row, token) pairs: only
those entries of the logits are touched. The helpers for that are the `*_for_row` functions here.

`RowHistory` keeps a request's history-derived state (seen ids, output counts, n-gram table) across
steps and brings it up to date from the tokens appended since the last step, so a step costs
O(new tokens) in Python. The state stays sparse (device id lists) rather than a dense [rows, vocab]
mask: on CPU a dense where() over 32 x 151936 logits costs ~50 ms, a sparse index_put ~2-27 ms.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tokenloom.sampling_params import SamplingParams

NEG_INF = float("-inf")


@dataclass
class TokenPairs:
    """Entries (rows[i], tokens[i]) of a [rows, vocab] tensor, with one value per entry where the
    processor needs one. No pair appears twice."""

    rows: torch.Tensor  # [num_pairs] long
    tokens: torch.Tensor  # [num_pairs] long
    values: torch.Tensor | None = None  # [num_pairs] float32


@dataclass
class RowValues:
    """A warper's setting for the rows that use it: values[i] belongs to row rows[i]; rows None
    means every row of the batch, in order. The warper then runs on those rows only."""

    values: torch.Tensor  # [num_rows]
    rows: torch.Tensor | None = None  # [num_rows] long

    def apply(self, logits: torch.Tensor, warper: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.rows is None:
            return warper(logits, self.values)
        return logits.index_put((self.rows,), warper(logits[self.rows], self.values))


class PairCollector:
    """Accumulates (row, token[, value]) pairs in Python and turns them into one TokenPairs."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.tokens: list[int] = []
        self.values: list[float] = []

    def add(self, row: int, tokens: Sequence[int], values: Sequence[float] | None = None) -> None:
        self.rows.extend([row] * len(tokens))
        self.tokens.extend(tokens)
        if values is not None:
            self.values.extend(values)

    def build(self, device: torch.device, vocab_size: int | None = None) -> TokenPairs | None:
        rows, tokens, values = self.rows, self.tokens, self.values
        if vocab_size is not None and any(t >= vocab_size for t in tokens):
            # An id the model cannot produce needs no processing (transformers clamps these away too).
            keep = [i for i, t in enumerate(tokens) if t < vocab_size]
            rows, tokens = [rows[i] for i in keep], [tokens[i] for i in keep]
            values = [values[i] for i in keep] if values else values
        if not rows:
            return None
        return TokenPairs(
            torch.tensor(rows, dtype=torch.long, device=device),
            torch.tensor(tokens, dtype=torch.long, device=device),
            torch.tensor(values, dtype=torch.float32, device=device) if values else None,
        )


# ---------------------------------------------------------------- per-row history (Python)


class GrowingTensor:
    """A 1-D device tensor written at the end or in place; capacity doubles, so appending costs
    O(new values), and `view()` is the filled part without a copy."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.data = torch.empty(0, dtype=dtype, device=device)
        self.size = 0

    def view(self) -> torch.Tensor:
        return self.data[: self.size]

    def write(self, positions: list[int], values: list) -> None:
        """data[positions[i]] = values[i]; positions may reach past the end (by appending)."""
        if not positions:
            return
        end = max(max(positions) + 1, self.size)
        if end > self.data.numel():
            grown = torch.empty(max(end, 2 * self.data.numel(), 16), dtype=self.data.dtype, device=self.data.device)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        if len(positions) == 1:
            self.data[positions[0]] = values[0]
        elif positions[-1] - positions[0] == len(positions) - 1 and positions == sorted(positions):
            self.data[positions[0] : positions[-1] + 1] = torch.tensor(values, dtype=self.data.dtype)
        else:
            index = torch.tensor(positions, dtype=torch.long)
            self.data.index_put_((index.to(self.data.device),), torch.tensor(values, dtype=self.data.dtype).to(self.data.device))
        self.size = end

    def extend(self, values: list) -> None:
        self.write(list(range(self.size, self.size + len(values))), values)


class RowHistory:
    """One request's history-derived processor state, kept across steps: the distinct ids of prompt +
    output (repetition penalty), each generated id's count (presence/frequency) and, for
    no_repeat_ngram_size n, every (n-1)-prefix -> the tokens that followed it. `sync()` folds in the
    tokens appended since the last call; the token list must only grow (a preempted sequence keeps
    its tokens and only recomputes its KV, so its state stays valid)."""

    _serials = itertools.count()

    def __init__(self, params: SamplingParams, token_ids: list[int], num_prompt: int, device: torch.device) -> None:
        self.serial = next(RowHistory._serials)  # tells a rebuilt state from the one it replaced
        self.params = params
        self.token_ids = token_ids
        self.num_prompt = num_prompt
        self.num_synced = 0
        self.repetition = params.repetition_penalty != 1.0
        self.seen: set[int] = set()
        self.seen_order: list[int] = []  # the distinct ids in the order they first appeared
        self.seen_ids = GrowingTensor(torch.long, device)  # [num distinct ids], the same ids, in any order
        self.num_seen_sorted = 0  # seen_ids[:num_seen_sorted] is sorted ascending
        self.counting = bool(params.presence_penalty or params.frequency_penalty)
        self.count_slots: dict[int, int] = {}  # token -> its position in count_ids / count_values
        self.counts: list[float] = []
        self.count_ids = GrowingTensor(torch.long, device)  # [num distinct output ids]
        self.count_values = GrowingTensor(torch.float32, device)  # [num distinct output ids]
        self.ngram_size = params.no_repeat_ngram_size
        self.ngrams: dict[tuple[int, ...], set[int]] = {}

    @staticmethod
    def is_needed(params: SamplingParams) -> bool:
        return params.repetition_penalty != 1.0 or bool(
            params.presence_penalty or params.frequency_penalty or params.no_repeat_ngram_size
        )

    def follows(self, params: SamplingParams, token_ids: list[int], num_prompt: int) -> bool:
        """Whether this state belongs to exactly this row (same parameters, same growing list)."""
        return (
            self.params is params and self.token_ids is token_ids and self.num_prompt == num_prompt
            and len(token_ids) >= self.num_synced
        )

    def sync(self) -> None:
        ids, start, end = self.token_ids, self.num_synced, len(self.token_ids)
        if start == end:
            return
        if self.repetition:
            fresh = [t for t in dict.fromkeys(ids[start:end]) if t not in self.seen]
            self.seen.update(fresh)
            self.seen_order.extend(fresh)
            self.seen_ids.extend(fresh)
        if self.counting and end > self.num_prompt:
            changed: dict[int, None] = {}
            new_ids: list[int] = []
            for t in ids[max(start, self.num_prompt) : end]:
                slot = self.count_slots.get(t)
                if slot is None:
                    slot = self.count_slots[t] = len(self.counts)
                    self.counts.append(0.0)
                    new_ids.append(t)
                self.counts[slot] += 1.0
                changed[slot] = None
            slots = list(changed)
            self.count_ids.extend(new_ids)
            self.count_values.write(slots, [self.counts[s] for s in slots])
        n = self.ngram_size
        if n:
            for i in range(max(start, n - 1), end):  # the window ending at i
                self.ngrams.setdefault(tuple(ids[i - n + 1 : i]), set()).add(ids[i])
        self.num_synced = end

    def sorted_seen_ids(self) -> torch.Tensor:
        """seen_ids, mostly ascending: the penalty gathers and scatters these positions of a logits
        row, and ascending positions run about twice as fast on CPU as first-seen order. Re-sorted
        only once the unsorted tail passes a fifth, so the sorting costs O(log n) per id."""
        size = self.seen_ids.size
        if size - self.num_seen_sorted > size // 5:
            self.seen_ids.data[:size] = torch.sort(self.seen_ids.view()).values
            self.num_seen_sorted = size
        return self.seen_ids.view()

    def ngram_bans(self) -> set[int]:
        """As `ngram_bans_for_row(token_ids, ngram_size)`, from the table (after `sync()`)."""
        n, ids = self.ngram_size, self.token_ids
        if len(ids) < n:
            return set()
        return self.ngrams.get(tuple(ids[len(ids) - n + 1 :]), set())


def sequence_bias_for_row(token_ids: Sequence[int], sequence_bias: dict[tuple[int, ...], float]) -> dict[int, float]:
    """token -> total bias for the next position (SequenceBiasLogitsProcessor): a 1-token key always
    applies; a longer key applies to its last token when the context ends with the rest of it."""
    total: dict[int, float] = {}
    length = len(token_ids)
    for key, bias in sequence_bias.items():
        prefix_len = len(key) - 1
        if prefix_len and (prefix_len > length or list(token_ids[length - prefix_len :]) != list(key[:-1])):
            continue
        total[key[-1]] = total.get(key[-1], 0.0) + bias
    return total


def bad_words_for_row(token_ids: Sequence[int], bad_words_ids: list[list[int]], stop_token_ids: list[int]) -> set[int]:
    """Tokens that would complete a bad word (NoBadWordsLogitsProcessor). As transformers, a
    one-token bad word that is an EOS (stop) id is ignored."""
    banned: set[int] = set()
    length = len(token_ids)
    for word in bad_words_ids:
        if len(word) == 1 and word[0] in stop_token_ids:
            continue
        prefix_len = len(word) - 1
        if prefix_len == 0 or (prefix_len <= length and list(token_ids[length - prefix_len :]) == word[:-1]):
            banned.add(word[-1])
    return banned


def ngram_bans_for_row(token_ids: Sequence[int], ngram_size: int) -> set[int]:
    """Tokens that would repeat an n-gram of `token_ids` (NoRepeatNGramLogitsProcessor): every
    earlier window whose first n-1 tokens equal the last n-1 tokens bans its own last token."""
    length = len(token_ids)
    if ngram_size <= 0 or length < ngram_size:
        return set()
    tokens = list(token_ids)
    if ngram_size == 1:
        return set(tokens)
    prefix = tokens[length - ngram_size + 1 :]
    last_start = length - ngram_size  # the last complete window starts here
    banned: set[int] = set()
    start = 0
    while True:
        try:
            start = tokens.index(prefix[0], start, last_start + 1)
        except ValueError:
            return banned
        if tokens[start : start + ngram_size - 1] == prefix:
            banned.add(tokens[start + ngram_size - 1])
        start += 1


# ---------------------------------------------------------------- processors (all rows)


def apply_sequence_bias(logits: torch.Tensor, bias: TokenPairs) -> torch.Tensor:
    """Adds each pair's bias (SequenceBiasLogitsProcessor, logit_bias)."""
    index = (bias.rows, bias.tokens)
    return logits.index_put(index, logits[index] + bias.values)


def apply_repetition_penalty(logits: torch.Tensor, seen: TokenPairs) -> torch.Tensor:
    """RepetitionPenaltyLogitsProcessor: a seen token's logit is divided by the penalty when
    positive and multiplied by it when negative. `seen.values` holds the row's penalty."""
    index = (seen.rows, seen.tokens)
    scores = logits[index]
    penalized = torch.where(scores < 0, scores * seen.values, scores / seen.values)
    return logits.index_put(index, penalized)


def apply_presence_frequency(
    logits: torch.Tensor, counts: TokenPairs, frequency: torch.Tensor, presence: torch.Tensor
) -> torch.Tensor:
    """OpenAI/vLLM penalties: logit -= frequency * count, then -= presence, for every token the row
    generated. `counts.values` holds the counts; frequency/presence are per row [rows]."""
    index = (counts.rows, counts.tokens)
    scores = logits[index] - frequency[counts.rows] * counts.values
    return logits.index_put(index, scores - presence[counts.rows])


def apply_bans(logits: torch.Tensor, banned: TokenPairs) -> torch.Tensor:
    """-inf at each pair: no-repeat n-grams, bad words, min_tokens, suppress_tokens and
    begin_suppress_tokens. They come after the bias and the penalties in transformers' order, and
    -inf absorbs anything done after, so one pass does all of them."""
    return logits.index_put((banned.rows, banned.tokens), logits.new_tensor(NEG_INF))


# ---------------------------------------------------------------- warpers (sampling rows)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """TemperatureLogitsWarper; rows at 1.0 are unchanged (x / 1 == x)."""
    return logits / temperature[:, None]


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_k: int | None = None) -> torch.Tensor:
    """TopKLogitsWarper: keep, per row, the tokens whose logit is >= the k-th largest (ties kept);
    rows with top_k 0 keep everything. `max_k`, the largest top_k, saves a device sync."""
    vocab = logits.shape[-1]
    k = top_k.clamp(max=vocab)  # [rows]
    max_k = min(int(k.max()) if max_k is None else max_k, vocab)
    if max_k == 0:
        return logits
    top_values = torch.topk(logits, max_k, dim=-1).values  # [rows, max_k]
    threshold = top_values.gather(1, (k.clamp(min=1) - 1)[:, None])  # [rows, 1]
    threshold = threshold.masked_fill((k == 0)[:, None], NEG_INF)
    return logits.masked_fill(logits < threshold, NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """MinPLogitsWarper: drop tokens whose probability is below min_p times the top probability,
    keeping the most likely token. Rows with min_p 0 remove nothing."""
    probs = logits.softmax(dim=-1)
    remove = probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    remove = remove.scatter(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, NEG_INF)


def apply_typical(logits: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """TypicalLogitsWarper: keep the tokens whose surprisal is closest to the entropy until their
    mass reaches `mass` (at least one). Rows with mass >= 1 are untouched."""
    normalized = logits.log_softmax(dim=-1)
    entropy = -(normalized * normalized.exp()).nansum(-1, keepdim=True)
    shifted = torch.abs(-normalized - entropy)
    sorted_shifted, sorted_idx = torch.sort(shifted, descending=False)
    cumulative = logits.gather(-1, sorted_idx).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass[:, None]).sum(dim=1).clamp(max=logits.shape[-1] - 1)
    remove_sorted = sorted_shifted > sorted_shifted.gather(1, last[:, None])
    remove_sorted[:, 0] = False
    remove_sorted &= (mass < 1)[:, None]
    return logits.masked_fill(remove_sorted.scatter(1, sorted_idx, remove_sorted), NEG_INF)


def apply_epsilon(logits: torch.Tensor, epsilon: torch.Tensor) -> torch.Tensor:
    """EpsilonLogitsWarper: drop tokens with probability < epsilon, except the most likely.
    Rows with epsilon 0 remove nothing."""
    remove = logits.softmax(dim=-1) < epsilon[:, None]
    remove &= logits < logits.amax(dim=-1, keepdim=True)
    return logits.masked_fill(remove, NEG_INF)


def apply_eta(logits: torch.Tensor, epsilon: torch.Tensor) -> torch.Tensor:
    """EtaLogitsWarper: drop tokens with probability < min(epsilon, sqrt(epsilon) * exp(-entropy)),
    except the most likely. Rows with epsilon 0 remove nothing."""
    entropy = torch.distributions.Categorical(logits=logits, validate_args=False).entropy()  # [rows]
    eta = torch.minimum(epsilon, epsilon.sqrt() * torch.exp(-entropy))[:, None]
    remove = (logits.softmax(dim=-1) < eta) & (logits < logits.amax(dim=-1, keepdim=True))
    return logits.masked_fill(remove, NEG_INF)


def apply_renormalize(logits: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """LogitNormalization (log-softmax), last of all; `rows` [rows] bool selects the rows, None all."""
    normalized = logits.log_softmax(dim=-1)
    return normalized if rows is None else torch.where(rows[:, None], normalized, logits)
