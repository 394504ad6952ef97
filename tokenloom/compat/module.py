"""The torch-module surface of the compat model: the model's own module tree under transformers'
names, forward() with labels and hidden states, save_pretrained, to() / cuda() / half() that move the
engine with the weights, and the transformers helpers around them."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from tokenloom.compat.forward import CausalLMOutput, causal_lm_forward, check_forward_args
from tokenloom.compat.hf_names import fused_state_dict, hf_named_tensors
from tokenloom.engine.engine import Engine
from tokenloom.loading import LoadedModel
from tokenloom.models.base import CausalLM
from tokenloom.models.linear import EMBEDDING_FORMATS

_EMBEDDINGS = (nn.Embedding, *EMBEDDING_FORMATS)


class EngineModule(nn.Module):
    """A torch module whose tree is a loaded model's, bound to an engine (`self.engine`, set by the
    subclass) that runs it. Subclasses set `config` (a ModelConfig) too."""

    engine: Engine

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__()
        self._loaded = loaded
        # Share the model's child/parameter/buffer tables: this module *is* the model's tree (no extra
        # `model.` prefix on the names), and moving one moves the other.
        for table in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            object.__setattr__(self, table, getattr(loaded.model, table))

    @property
    def causal_lm(self) -> CausalLM:
        """tokenloom's model object (what the engine runs)."""
        return self._loaded.model

    @property
    def device(self) -> torch.device:
        return self._loaded.device

    @property
    def dtype(self) -> torch.dtype:
        return self._loaded.dtype

    def train(self, mode: bool = True) -> EngineModule:
        """eval() is accepted; training mode is refused: tokenloom runs inference only."""
        if mode:
            raise NotImplementedError("model.train() is not supported: tokenloom runs inference only (no gradients, "
                                      "no dropout); load the model with transformers to train it")
        return super().train(False)

    def to(self, *args: Any, **kwargs: Any) -> EngineModule:
        """As torch's Module.to (device, dtype or both); a device without CUDA is refused by name."""
        from tokenloom.device import resolve_device

        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            resolve_device(device)
        return super().to(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> EngineModule:
        super()._apply(fn, recurse)
        first = next((p for p in self.parameters() if p.is_floating_point()), None)
        if first is not None and (first.device, first.dtype) != (self.device, self.dtype):
            self._loaded.device, self._loaded.dtype = first.device, first.dtype
            self.config.dtype = first.dtype
            self.engine = Engine(self.causal_lm, self.engine.config, tokenizer=self.engine.tokenizer)
        return self

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        """Under transformers' names: a fused qkv_proj / gate_up_proj shows as q_proj, k_proj, v_proj /
        gate_proj, up_proj (views of its rows)."""
        head = f"{prefix}." if prefix else ""
        own = super().named_parameters(recurse=recurse, remove_duplicate=remove_duplicate)
        for name, param in hf_named_tensors(self, self.causal_lm, own):
            yield head + name, param  # type: ignore[misc]

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """transformers' names and tensors (fused projections shown as their checkpoint tensors)."""
        if args:  # torch's deprecated positional form: (destination, prefix, keep_vars)
            destination = args[0]
            prefix = args[1] if len(args) > 1 else prefix
            keep_vars = args[2] if len(args) > 2 else keep_vars
        own = super().state_dict(prefix="", keep_vars=keep_vars)
        out = OrderedDict() if destination is None else destination
        for name, tensor in hf_named_tensors(self, self.causal_lm, iter(own.items())):
            out[prefix + name] = tensor if keep_vars else tensor.detach()
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Takes transformers' names (what state_dict() gives): q/k/v and gate/up row blocks are joined
        into the fused projections, then loaded as torch's Module.load_state_dict does."""
        fused = fused_state_dict(self, self.causal_lm, dict(state_dict))
        return super().load_state_dict(fused, strict=strict, assign=assign)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters counted as transformers counts them (a tied weight once)."""
        embeddings = {f"{name}.weight" for name, m in self.named_modules() if isinstance(m, _EMBEDDINGS)}
        return sum(
            p.numel() for name, p in self.named_parameters()
            if (not exclude_embeddings or name not in embeddings) and (not only_trainable or p.requires_grad)
        )  # fmt: skip

    def get_input_embeddings(self) -> nn.Module:
        return next(m for m in self.modules() if isinstance(m, _EMBEDDINGS))

    def get_output_embeddings(self) -> nn.Module | None:
        return getattr(self.causal_lm, "lm_head", None)

    def can_generate(self) -> bool:
        return True

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        num_items_in_batch: Any = None,
        shift_labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutput | tuple[Any, ...]:
        """transformers' forward: logits [batch, seq_len, vocab] (zeros at padded positions), the loss
        for `labels` (-100 ignored), hidden states with output_hidden_states. Rows are stripped of
        their padding first, so each row's positions count from its first real token. past_key_values,
        use_cache=True, inputs_embeds, position_ids and output_attentions are refused by name."""
        check_forward_args(use_cache, output_attentions, kwargs)
        out = causal_lm_forward(
            self, input_ids, attention_mask, labels=labels, output_hidden_states=output_hidden_states,
            logits_to_keep=logits_to_keep, num_items_in_batch=num_items_in_batch, shift_labels=shift_labels,
        )  # fmt: skip
        return out.to_tuple() if return_dict is False else out

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """Write config.json, model.safetensors (sharded past max_shard_size) and generation_config.json:
        a directory that transformers' and tokenloom's from_pretrained both load."""
        from tokenloom.compat.save import save_pretrained

        save_pretrained(self, save_directory, **kwargs)
