"""The tokenizer's output container (L6)."""

from __future__ import annotations

from typing import Any


class BatchEncoding(dict):
    """The tokenizer's output: a dict (input_ids, attention_mask, ...) with attribute access."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no {name!r}; keys are {list(self)}") from None

    @property
    def data(self) -> dict[str, Any]:
        """The plain dict of values (transformers' UserDict-style access)."""
        return dict(self)

    def to(self, device: Any, *, non_blocking: bool = False) -> BatchEncoding:
        """Move every tensor value to `device` in place and return self."""
        for key, value in self.items():
            if callable(getattr(value, "to", None)):
                self[key] = value.to(device=device, non_blocking=non_blocking)
        return self
