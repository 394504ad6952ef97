"""Server settings (L6)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerConfig:
    """What `tokenloom serve` was told.

    served_model_name: the name clients send as `model` (404 for any other).
    api_key: when set, every API route needs `Authorization: Bearer <api_key>` (401 otherwise).
    max_concurrent_requests: requests computed at once; past it up to `max_queue` wait, the rest get 429.
    max_input_tokens / max_total_tokens: per-request limits (default: the model's context length).
    max_body_bytes: larger request bodies get 413.
    chat_template: Jinja source that replaces the model's own chat template.
    """

    served_model_name: str = "tokenloom"
    api_key: str | None = None
    max_concurrent_requests: int = 128
    max_queue: int = 256
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_body_bytes: int = 4 << 20
    chat_template: str | None = None
    model_id: str | None = None  # what /info and /v1/models report as the source

    def __post_init__(self) -> None:
        for name in ("max_concurrent_requests", "max_body_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.max_queue, int) or isinstance(self.max_queue, bool) or self.max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {self.max_queue!r}")
        for name in ("max_input_tokens", "max_total_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.served_model_name:
            raise ValueError("served_model_name must not be empty")
