"""The render budget of chat templates, enforced inside jinja's sandbox.

A template is code from a stranger, and a server renders one on every request. Each render gets a
budget: time, loop iterations (counted across the whole render), output size, the size of every value
the template builds, the bytes it allocates in total and the size of integers. Sizes are refused
*before* they are computed (a signal cannot interrupt `10 ** 10000000` or `'x' * 10**9`): the
operators `*`, `**`, `+` and `%` are intercepted (`intercepted_binops` / `call_binop`), `~` and the
buffers of macros and `{% set %}` blocks are joined through the budget, string methods and filters
that amplify (`center`, `ljust`, `replace`, `join`, `indent`, `format`, `batch`, ...) are estimated
from their arguments, and every `{% for %}` body and loop test ticks the iteration counter. The
rendered output is streamed and cut past its cap. Every overrun is a `ChatTemplateError` naming the
limit; a real template renders exactly as before (nothing here changes a value).
"""

from __future__ import annotations

import sys
import time
from contextvars import ContextVar
from dataclasses import dataclass, fields
from typing import Any

import jinja2.utils

from tokenloom.errors import ChatTemplateError


@dataclass(frozen=True)
class RenderBudget:
    """Limits of one render. Those marked "per input" grow with the text the template is given
    (messages, tools, documents, keyword values): a long conversation may take longer and render
    longer, a template may not."""

    max_seconds: float = 1.0  # per MB of input (at least this)
    max_loop_iterations: int = 200_000  # per MB of input (at least this)
    max_output_chars: int = 1_000_000  # at least; or output_per_input_char times the input
    output_per_input_char: int = 4
    max_allocated_bytes: int = 64 << 20  # at least; or allocated_per_input_byte times the input
    allocated_per_input_byte: int = 16
    max_int_bits: int = 16_384
    max_template_chars: int = 262_144  # the template source itself
    max_count_argument: int = 100_000  # slice(n), lipsum(n) and the like

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


DEFAULT_BUDGET = RenderBudget()


class _NotRendering(RuntimeError):
    """A budgeted filter was called outside a render: jinja's constant folding at compile time. The
    optimizer catches it and leaves the call to run (within the budget) at render time."""


def over_budget(what: str, limit_name: str, limit: Any) -> ChatTemplateError:
    return ChatTemplateError(
        f"chat template rendering went over its budget: {what} (limit {limit_name}={limit})",
        hint="the template loops, repeats or builds text far beyond what a conversation needs; fix or replace it",
    )


class RenderState:
    """The counters of one render against its budget."""

    def __init__(self, budget: RenderBudget, input_chars: int) -> None:
        scale = max(1.0, input_chars / 1_000_000)
        self.budget = budget
        self.seconds = budget.max_seconds * scale
        self.deadline = time.monotonic() + self.seconds
        self.max_iterations = int(budget.max_loop_iterations * scale)
        self.max_chars = max(budget.max_output_chars, budget.output_per_input_char * input_chars)
        self.max_allocated = max(budget.max_allocated_bytes, budget.allocated_per_input_byte * input_chars)
        self.iterations = 0
        self.allocated = 0
        self.output_chars = 0

    # ---- counters
    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise over_budget(f"it ran longer than {self.seconds:g} s", "max_seconds", self.budget.max_seconds)

    def tick(self) -> bool:
        self.iterations += 1
        if self.iterations > self.max_iterations:
            raise over_budget(
                f"more than {self.max_iterations} loop iterations", "max_loop_iterations", self.max_iterations
            )
        if not self.iterations & 63:
            self.check_time()
        return True

    def check_size(self, size: int, what: str) -> None:
        if size > self.max_chars:
            raise over_budget(f"{what} would hold {size} characters or items", "max_output_chars", self.max_chars)

    def check_text(self, value: Any, what: str) -> None:
        self.check_size(text_size(value, self.max_chars), what)

    def check_int(self, bits: int, what: str) -> None:
        if bits > self.budget.max_int_bits:
            raise over_budget(f"{what} would be an integer of about {bits} bits", "max_int_bits", self.budget.max_int_bits)

    def check_count(self, count: Any, what: str) -> None:
        if isinstance(count, int) and count > self.budget.max_count_argument:
            raise over_budget(f"{what} is {count}", "max_count_argument", self.budget.max_count_argument)

    def charge(self, value: Any, what: str) -> None:
        """Count a value the template built: its size, and the bytes allocated over the render."""
        if isinstance(value, (str, bytes, bytearray, list, tuple, dict, set, frozenset)):
            self.check_size(len(value), what)
            self.allocated += sys.getsizeof(value)
            if self.allocated > self.max_allocated:
                raise over_budget(
                    f"it allocated more than {self.max_allocated} bytes", "max_allocated_bytes", self.max_allocated
                )

    def add_output(self, piece: str) -> None:
        self.output_chars += len(piece)
        if self.output_chars > self.max_chars:
            raise over_budget(
                f"the rendered text passed {self.max_chars} characters", "max_output_chars", self.max_chars
            )
        self.check_time()


STATE: ContextVar[RenderState | None] = ContextVar("tokenloom_chat_template_render", default=None)


def current_state() -> RenderState:
    state = STATE.get()
    if state is None:
        raise _NotRendering("budgeted call outside a render")
    return state


# ---------------------------------------------------------------- sizes


def text_size(value: Any, limit: int) -> int:
    """About how many characters `str(value)` has (its parts counted without repr escapes), stopping
    as soon as the count passes `limit`; cheap (one step per element, no string is built)."""
    total, steps = 0, 0
    stack = [value]
    seen: set[int] = set()
    while stack and total <= limit:
        item = stack.pop()
        steps += 1
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, (bytes, bytearray)):
            total += 4 * len(item) + 3
        elif isinstance(item, bool) or item is None:
            total += 5
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 2
        elif isinstance(item, float):
            total += 24
        elif isinstance(item, (list, tuple, set, frozenset, dict, jinja2.utils.Namespace)):
            if id(item) in seen:
                total += 5
                continue
            seen.add(id(item))
            if isinstance(item, jinja2.utils.Namespace):
                item = object.__getattribute__(item, "_Namespace__attrs")
            total += 2 + 2 * len(item)
            if isinstance(item, dict):
                for key, element in item.items():
                    stack.append(key)
                    stack.append(element)
            else:
                stack.extend(item)
        else:
            total += 16
        if steps > limit:
            return steps
    return total


def is_container(value: Any) -> bool:
    return isinstance(value, (list, tuple, set, frozenset, dict, jinja2.utils.Namespace))


def text_length(value: Any, limit: int) -> int:
    return len(value) if isinstance(value, str) else text_size(value, limit)


def input_size(*values: Any) -> int:
    """Characters of text in the data a template is given (strings anywhere in it, keys included)."""
    total = 0
    stack = list(values)
    seen: set[int] = set()
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, (list, tuple, dict)):
            if id(item) in seen:  # the data's own containers stay alive meanwhile, so ids are theirs
                continue
            seen.add(id(item))
            if isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())
            else:
                stack.extend(item)
    return total
