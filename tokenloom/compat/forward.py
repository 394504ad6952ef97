"""`model(input_ids, ...)` as transformers' *ForCausalLM.forward: logits for every position, the
loss for `labels=`, hidden states with `output_hidden_states=True`. Arguments tokenloom does not
implement are refused by name, never ignored.

Rows are stripped of their padding and scored by the engine (so their positions count from 0 at the
first real token); padded positions get zeros. Hidden states are read with forward hooks on the
decoder layers, held only for the call, so the model files need to know nothing about them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from tokenloom.compat.inputs import check_inputs
from tokenloom.compat.padding import strip_padding

IGNORE_INDEX = -100

# forward() arguments of transformers that tokenloom does not implement: why, in the refusal.
_NO_CACHE = "forward() neither takes nor returns a KV cache (the engine keeps its own); pass the whole sequence, " \
    "or use generate()"
REFUSED_FORWARD_ARGS: dict[str, str] = {
    "past_key_values": _NO_CACHE,
    "cache": _NO_CACHE,
    "cache_position": _NO_CACHE,
    "inputs_embeds": "pass input_ids",
    "position_ids": "positions follow the attention mask: each row's first real token is position 0",
    "token_type_ids": "decoder-only models here take no token types",
    "head_mask": "attention heads cannot be masked",
}


@dataclass
class CausalLMOutput:
    """transformers' CausalLMOutputWithPast: attributes, `out["logits"]`, and `out[0]` / to_tuple()
    over the fields that are set (loss first when labels were given)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # [batch, seq_len, vocab]; padded positions hold zeros
    past_key_values: None = None  # never returned: the KV cache lives in the engine
    hidden_states: tuple[torch.Tensor | None, ...] | None = None  # num_layers + 1 of [batch, seq_len, hidden]
    attentions: None = None

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, k) for k in self.keys())

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())


def check_forward_args(use_cache: Any, output_attentions: Any, kwargs: dict[str, Any]) -> None:
    """Refuse, by name, what forward() does not implement."""
    for name, why in REFUSED_FORWARD_ARGS.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"forward() argument {name} is not supported by tokenloom: {why}")
    unknown = sorted(set(kwargs) - set(REFUSED_FORWARD_ARGS))
    if unknown:
        raise TypeError(f"forward() got unexpected keyword argument(s): {', '.join(unknown)}")
    if use_cache:
        raise NotImplementedError(f"forward() argument use_cache=True is not supported by tokenloom: {_NO_CACHE}")
    if output_attentions:
        raise NotImplementedError(
            "forward() argument output_attentions=True is not supported by tokenloom: the paged attention "
            "never materialises the attention weights"
        )


def decoder_layers(causal_lm: nn.Module) -> nn.ModuleList:
    """The decoder stack: the ModuleList with one module per hidden layer (`model.layers`, `transformer.h`)."""
    count = causal_lm.config.num_hidden_layers  # type: ignore[union-attr]
    for module in causal_lm.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise NotImplementedError(f"{type(causal_lm).__name__} has no list of {count} decoder layers to read")


@contextlib.contextmanager
def _recorded(causal_lm: nn.Module) -> Iterator[list[list[torch.Tensor]]]:
    """While inside, every model call appends its flat [num_tokens, hidden] states to the yielded lists:
    [input of layer 0, output of layer 0, ..., output of the last layer, the final (normed) output]."""
    layers = decoder_layers(causal_lm)
    records: list[list[torch.Tensor]] = [[] for _ in range(len(layers) + 2)]

    def first(_module: nn.Module, args: tuple[Any, ...]) -> None:
        records[0].append(args[0])

    def after(index: int) -> Any:
        def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            records[index].append(output[0] if isinstance(output, tuple) else output)

        return hook

    handles = [layers[0].register_forward_pre_hook(first)]
    handles += [layer.register_forward_hook(after(i + 1)) for i, layer in enumerate(layers)]
    handles.append(causal_lm.register_forward_hook(after(len(layers) + 1)))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def hidden_state_indices(selection: Any, count: int) -> set[int] | None:
    """transformers' output_hidden_states: True (all: None here), an index or a list of indices."""
    if isinstance(selection, bool):
        return None
    chosen = [selection] if isinstance(selection, int) else list(selection)
    return {i % count for i in chosen if -count <= i < count}


def causal_lm_forward(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    labels: torch.Tensor | None = None,
    output_hidden_states: Any = None,
    logits_to_keep: int | torch.Tensor = 0,
    num_items_in_batch: Any = None,
    shift_labels: torch.Tensor | None = None,
) -> CausalLMOutput:
    """The output of `model` (a TokenloomForCausalLM) for a [batch, seq_len] batch of token ids."""
    input_ids, attention_mask = check_inputs(input_ids, attention_mask)
    rows, positions = strip_padding(input_ids, attention_mask)
    causal_lm = model.causal_lm
    want_hidden = output_hidden_states is not None and output_hidden_states is not False
    with _recorded(causal_lm) if want_hidden else contextlib.nullcontext() as records:
        per_row = model.engine.prompt_logits(rows)
    logits = torch.zeros((*input_ids.shape, causal_lm.config.vocab_size), dtype=model.dtype, device=model.device)
    for i, (row_logits, pos) in enumerate(zip(per_row, positions)):
        logits[i, pos.to(logits.device)] = row_logits
    hidden_states = _scatter_hidden(records, rows, positions, input_ids.shape, output_hidden_states) \
        if records is not None else None
    loss = None
    if labels is not None:  # as transformers: shift_labels only counts together with labels
        if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("labels need the logits of every position: leave logits_to_keep at 0")
        loss = causal_lm_loss(logits, labels, attention_mask, num_items_in_batch, shift_labels)
    return CausalLMOutput(loss=loss, logits=_keep(logits, logits_to_keep), hidden_states=hidden_states)


def _keep(logits: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """transformers' slice_logits_to_keep: the last N positions (0: all), or the positions given."""
    if isinstance(logits_to_keep, int):
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0, got {logits_to_keep}")
        return logits[:, -logits_to_keep:] if logits_to_keep else logits
    return logits[:, logits_to_keep.to(logits.device)]


def _scatter_hidden(
    records: list[list[torch.Tensor]], rows: list[list[int]], positions: list[torch.Tensor],
    shape: torch.Size, selection: Any,
) -> tuple[torch.Tensor | None, ...]:
    """The flat per-call records as transformers' tuple: embeddings, each layer's output except the
    last one's, which is replaced by the final normed output; [batch, seq_len, hidden], zeros where padded."""
    states = [*records[:-2], records[-1]]
    chosen = hidden_state_indices(selection, len(states))
    lengths = [len(r) for r in rows]
    out: list[torch.Tensor | None] = []
    for index, pieces in enumerate(states):
        if chosen is not None and index not in chosen:
            out.append(None)
            continue
        flat = torch.cat(pieces)  # [sum(lengths), hidden]: the rows in order, over the engine's batches
        padded = flat.new_zeros((*shape, flat.shape[-1]))
        for i, (row_states, pos) in enumerate(zip(flat.split(lengths), positions)):
            padded[i, pos.to(padded.device)] = row_states
        out.append(padded)
    return tuple(out)


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    num_items_in_batch: Any = None,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' ForCausalLMLoss: position t predicts labels[t + 1]; -100 is ignored; the mean over
    the counted tokens (the sum divided by num_items_in_batch when given). A label predicted from a
    padded position must be -100: tokenloom computes no logits there (transformers computes some)."""
    batch, seq_len, vocab = logits.shape
    if shift_labels is None:
        assert labels is not None
        if tuple(labels.shape) != (batch, seq_len):
            raise ValueError(f"labels must have the shape of input_ids {(batch, seq_len)}, got {tuple(labels.shape)}")
        shift_labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    elif tuple(shift_labels.shape) != (batch, seq_len):
        raise ValueError(f"shift_labels must have the shape of input_ids {(batch, seq_len)}, got "
                         f"{tuple(shift_labels.shape)}")
    shift_labels = shift_labels.to(logits.device)
    if attention_mask is not None:
        padded = (attention_mask.to(logits.device) == 0) & (shift_labels != IGNORE_INDEX)
        if bool(padded.any()):
            row, col = (int(v) for v in padded.nonzero()[0])
            raise ValueError(
                f"labels must be {IGNORE_INDEX} after a padded position (row {row}: position {col} has "
                f"attention_mask 0 and the label after it is {int(shift_labels[row, col])}): tokenloom computes no "
                "logits at padded positions. Set such labels to -100 (with left padding, each row's first real token)"
            )
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = nn.functional.cross_entropy(
        logits.float().reshape(-1, vocab), shift_labels.reshape(-1).long(), ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )  # fmt: skip
    if num_items_in_batch is not None:
        loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
    return loss
