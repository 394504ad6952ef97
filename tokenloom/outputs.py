"""What generation yields to every face (L0: no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    """One request's progress after a step.

    new_token_ids/text_delta: what this step added; token_ids/text: everything generated so far.
    finish_reason: None while running, else "eos", "length" or "abort".
    """

    request_id: str
    prompt_token_ids: list[int]
    new_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    text_delta: str = ""
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
