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

import functools
import re
import string
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, fields
from typing import Any

import jinja2
import jinja2.nodes as nodes
import jinja2.utils
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment

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


def _over(what: str, limit_name: str, limit: Any) -> ChatTemplateError:
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
            raise _over(f"it ran longer than {self.seconds:g} s", "max_seconds", self.budget.max_seconds)

    def tick(self) -> bool:
        self.iterations += 1
        if self.iterations > self.max_iterations:
            raise _over(
                f"more than {self.max_iterations} loop iterations", "max_loop_iterations", self.max_iterations
            )
        if not self.iterations & 63:
            self.check_time()
        return True

    def check_size(self, size: int, what: str) -> None:
        if size > self.max_chars:
            raise _over(f"{what} would hold {size} characters or items", "max_output_chars", self.max_chars)

    def check_text(self, value: Any, what: str) -> None:
        self.check_size(text_size(value, self.max_chars), what)

    def check_int(self, bits: int, what: str) -> None:
        if bits > self.budget.max_int_bits:
            raise _over(f"{what} would be an integer of about {bits} bits", "max_int_bits", self.budget.max_int_bits)

    def check_count(self, count: Any, what: str) -> None:
        if isinstance(count, int) and count > self.budget.max_count_argument:
            raise _over(f"{what} is {count}", "max_count_argument", self.budget.max_count_argument)

    def charge(self, value: Any, what: str) -> None:
        """Count a value the template built: its size, and the bytes allocated over the render."""
        if isinstance(value, (str, bytes, bytearray, list, tuple, dict, set, frozenset)):
            self.check_size(len(value), what)
            self.allocated += sys.getsizeof(value)
            if self.allocated > self.max_allocated:
                raise _over(
                    f"it allocated more than {self.max_allocated} bytes", "max_allocated_bytes", self.max_allocated
                )

    def add_output(self, piece: str) -> None:
        self.output_chars += len(piece)
        if self.output_chars > self.max_chars:
            raise _over(
                f"the rendered text passed {self.max_chars} characters", "max_output_chars", self.max_chars
            )
        self.check_time()


_STATE: ContextVar[RenderState | None] = ContextVar("tokenloom_chat_template_render", default=None)


def _state() -> RenderState:
    state = _STATE.get()
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


def _is_container(value: Any) -> bool:
    return isinstance(value, (list, tuple, set, frozenset, dict, jinja2.utils.Namespace))


def _as_text_len(value: Any, limit: int) -> int:
    return len(value) if isinstance(value, str) else text_size(value, limit)


# printf-style conversions: their widths and precisions
_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[diouxXeEfFgGcrsab%]")


def _check_printf(state: RenderState, template: str, args: Any, what: str) -> None:
    """`'%10s' % x` / `format` filter: refuse widths/precisions (given or taken from `*`) over the cap."""
    star = False
    for width, precision in _PRINTF_SPEC.findall(template):
        for number in (width, precision):
            if number == "*":
                star = True
            elif number:
                state.check_size(int(number), f"{what}: a field width of {number}")
    if star:
        values = args if isinstance(args, tuple) else (args,)
        for value in values:
            if isinstance(value, int):
                state.check_size(abs(value), f"{what}: a '*' field width of {value}")
    state.check_size(len(template) + text_size(args, state.max_chars), what)


def _check_str_format(state: RenderState, template: str, args: tuple, kwargs: dict, what: str) -> None:
    """`'{:>10}'.format(x)`: widths in format specs are bounded; nested fields in a spec are refused."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ChatTemplateError(f"chat template: bad format string {template[:80]!r}: {exc}") from exc
    for _, _, spec, _ in parsed:
        if not spec:
            continue
        if "{" in spec:
            raise ChatTemplateError(
                f"chat template: nested replacement fields in a format spec ({spec[:40]!r}) are not allowed"
            )
        for number in re.findall(r"\d+", spec):
            state.check_size(int(number), f"{what}: a format width of {number}")
    state.check_size(len(template) + text_size((args, kwargs), state.max_chars), what)


def _replace_size(text: Any, old: Any, new: Any, count: Any) -> int:
    if not (isinstance(text, (str, bytes)) and isinstance(old, type(text)) and isinstance(new, type(text))):
        return 0
    occurrences = len(text) + 1 if not old else text.count(old)
    if isinstance(count, int) and count >= 0:
        occurrences = min(occurrences, count)
    return len(text) + occurrences * max(0, len(new) - len(old))


# ---------------------------------------------------------------- string and int methods


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _check_method_call(state: RenderState, obj: Any, args: tuple, kwargs: dict) -> tuple:
    """Estimate what a string/bytes/int method would build before it runs; returns the arguments to
    call it with (an iterator given to `join` is listed first, to be measured)."""
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", "")
    what = f"{type(owner).__name__}.{name}()"
    if isinstance(owner, (str, bytes, bytearray)):
        if name in ("center", "ljust", "rjust", "zfill"):
            width = _arg(args, kwargs, 0, "width")
            if isinstance(width, int):
                state.check_size(width, what)
        elif name == "expandtabs":
            tabsize = _arg(args, kwargs, 0, "tabsize", 8)
            if isinstance(tabsize, int):
                tab = "\t" if isinstance(owner, str) else b"\t"
                state.check_size(len(owner) + owner.count(tab) * max(tabsize, 0), what)  # type: ignore[arg-type]
        elif name == "replace":
            old, new = _arg(args, kwargs, 0, "old"), _arg(args, kwargs, 1, "new")
            state.check_size(_replace_size(owner, old, new, _arg(args, kwargs, 2, "count", -1)), what)
        elif name == "join" and args:
            items = args[0]
            if not hasattr(items, "__len__"):
                items = _take(state, items, what)
            state.check_size(len(items), what)
            parts = sum(len(x) for x in items if isinstance(x, (str, bytes, bytearray)))
            state.check_size(parts + len(owner) * max(len(items) - 1, 0), what)
            args = (items, *args[1:])
        elif name == "translate" and args and isinstance(args[0], Mapping):
            longest = max((len(v) for v in args[0].values() if isinstance(v, (str, bytes))), default=1)
            state.check_size(len(owner) * max(longest, 1), what)
    elif isinstance(owner, int) and name == "to_bytes":
        length = _arg(args, kwargs, 0, "length", 1)
        if isinstance(length, int):
            state.check_size(length, what)
    return args


def _take(state: RenderState, iterable: Any, what: str) -> list:
    items = []
    for item in iterable:
        items.append(item)
        if len(items) > state.max_chars:
            state.check_size(len(items), what)
    return items


# ---------------------------------------------------------------- filters


def _filter_center(state: RenderState, value: Any, args: tuple, kwargs: dict) -> None:
    width = _arg(args, kwargs, 0, "width", 80)
    if isinstance(width, int):
        state.check_size(width, "filter 'center'")


def _filter_indent(state: RenderState, value: Any, args: tuple, kwargs: dict) -> None:
    width = _arg(args, kwargs, 0, "width", 4)
    per_line = width if isinstance(width, int) else len(str(width)) if isinstance(width, str) else 0
    text = value if isinstance(value, str) else ""
    lines = text.count("\n") + 1
    state.check_size(_as_text_len(value, state.max_chars) + lines * max(per_line, 0), "filter 'indent'")


def _filter_wordwrap(state: RenderState, value: Any, args: tuple, kwargs: dict) -> None:
    width = _arg(args, kwargs, 0, "width", 79)
    wrapstring = _arg(args, kwargs, 2, "wrapstring") or "\n"
    length = _as_text_len(value, state.max_chars)
    if isinstance(width, int) and width > 0 and isinstance(wrapstring, str):
        newlines = value.count("\n") if isinstance(value, str) else 0
        state.check_size(length + (length // width + newlines + 1) * len(wrapstring), "filter 'wordwrap'")


def _filter_format(state: RenderState, value: Any, args: tuple, kwargs: dict) -> None:
    if isinstance(value, str):
        _check_printf(state, value, kwargs if kwargs else tuple(args), "filter 'format'")


def _filter_replace(state: RenderState, value: Any, args: tuple, kwargs: dict) -> None:
    old, new = _arg(args, kwargs, 0, "old"), _arg(args, kwargs, 1, "new")
    size = _replace_size(value, old, new, _arg(args, kwargs, 2, "count"))
    if not size and isinstance(new, str):  # jinja str()s the operands
        text = _as_text_len(value, state.max_chars)
        size = text + (text + 1) * len(new)
        if isinstance(old, str) and old:
            size = text + (text // len(old)) * max(0, len(new) - len(old))
    state.check_size(size, "filter 'replace'")


def _filter_tojson(state: RenderState, value: Any, args: tuple, kwargs: dict) -> None:
    indent = _arg(args, kwargs, 1, "indent")
    width = indent if isinstance(indent, int) else len(indent) if isinstance(indent, str) else 0
    state.check_size(text_size(value, state.max_chars) * (1 + max(width, 0)), "filter 'tojson'")


def _filter_batch(state: RenderState, value: Any, args: tuple, kwargs: dict) -> None:
    if _arg(args, kwargs, 1, "fill_with") is not None:
        linecount = _arg(args, kwargs, 0, "linecount")
        if isinstance(linecount, int):
            state.check_size(linecount, "filter 'batch' with fill_with")


def _filter_slice(state: RenderState, value: Any, args: tuple, kwargs: dict) -> None:
    state.check_count(_arg(args, kwargs, 0, "slices"), "filter 'slice': the number of slices")


def _filter_sum(state: RenderState, value: Any, args: tuple, kwargs: dict) -> None:
    start = _arg(args, kwargs, 1, "start", 0)
    if not isinstance(start, (int, float)):
        raise ChatTemplateError(
            "chat template: the 'sum' filter adds numbers only here (a start of "
            f"{type(start).__name__} would concatenate in quadratic time); use 'join' or a loop"
        )


def _filter_pprint(state: RenderState, value: Any, args: tuple, kwargs: dict) -> None:
    state.check_size(2 * text_size(value, state.max_chars), "filter 'pprint'")


_FilterCheck = Callable[[RenderState, Any, tuple, dict], None]
_FILTER_CHECKS: dict[str, _FilterCheck] = {
    "center": _filter_center,
    "indent": _filter_indent,
    "wordwrap": _filter_wordwrap,
    "format": _filter_format,
    "replace": _filter_replace,
    "tojson": _filter_tojson,
    "batch": _filter_batch,
    "slice": _filter_slice,
    "sum": _filter_sum,
    "pprint": _filter_pprint,
}
# Filters that turn their value into text: a list of a thousand references to one long string is
# small, its text is not.
_STRINGIFYING = frozenset({
    "string", "join", "upper", "lower", "title", "capitalize", "trim", "truncate", "striptags", "urlize",
    "urlencode", "wordcount", "e", "escape", "forceescape", "safe", "xmlattr",
})


def _budgeted_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    offset = 1 if jinja2.utils._PassArg.from_obj(func) is not None else 0
    check = _FILTER_CHECKS.get(name)
    what = f"filter {name!r}"

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        state = _state()
        state.check_time()
        value = args[offset] if len(args) > offset else None
        if name == "join" and value is not None and not hasattr(value, "__len__"):
            value = _take(state, value, what)
            args = (*args[:offset], value, *args[offset + 1 :])
        if check is not None:
            check(state, value, args[offset + 1 :], kwargs)
        if name in _STRINGIFYING and (_is_container(value) or isinstance(value, (bytes, int))):
            state.check_text(value, what)
        if name == "join":
            separator = _arg(args[offset + 1 :], kwargs, 0, "d", "")
            items = len(value) if hasattr(value, "__len__") else 0
            state.check_size(
                text_size(value, state.max_chars) + len(str(separator)) * max(items - 1, 0), what
            )
        result = func(*args, **kwargs)
        state.charge(result, what)
        return result

    return wrapper


# ---------------------------------------------------------------- globals


def _budgeted_range(*args: int) -> range:
    rng = range(*args)
    state = _state()
    if len(rng) > MAX_RANGE:
        raise _over(f"Range too big: range() of {len(rng)} items", "MAX_RANGE", MAX_RANGE)
    remaining = state.max_iterations - state.iterations
    if len(rng) > remaining:
        raise _over(
            f"range() of {len(rng)} items with {remaining} loop iterations left", "max_loop_iterations",
            state.max_iterations,
        )
    return rng


def _budgeted_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    state = _state()
    state.check_count(n, "lipsum(n)")
    state.check_count(max, "lipsum(max)")
    state.check_size(n * max * 12, "lipsum()")
    return jinja2.utils.generate_lorem_ipsum(n=n, html=html, min=min, max=max)


# ---------------------------------------------------------------- the environment


class _BudgetedCodeGenerator(CodeGenerator):
    """jinja's code generator, except that `a ~ b` is joined through the budget, slices (copies) are
    counted, and the loop ticks call the environment directly (not through the sandbox's `call`)."""

    @optimizeconst
    def visit_Getitem(self, node: nodes.Getitem, frame: Frame) -> None:
        if isinstance(node.arg, nodes.Slice):
            self.write("environment.tl_sliced(")
            super().visit_Getitem(node, frame)
            self.write(")")
        else:
            super().visit_Getitem(node, frame)

    def visit_Call(self, node: nodes.Call, frame: Frame, forward_caller: bool = False) -> None:
        if isinstance(node.node, nodes.EnvironmentAttribute) and node.node.name == "tl_tick":
            self.write("environment.tl_tick()")
            return
        super().visit_Call(node, frame, forward_caller=forward_caller)

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile:
            func_name = "(markup_join if context.eval_ctx.volatile else str_join)"
        elif frame.eval_ctx.autoescape:
            func_name = "markup_join"
        else:
            func_name = "str_join"
        self.write(f"environment.tl_join({func_name}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


def _finalize(value: Any) -> Any:
    """Every `{{ value }}`: its text is measured before it is built (the value itself is unchanged)."""
    state = _STATE.get()
    if state is not None and not isinstance(value, str):
        if _is_container(value) or isinstance(value, (bytes, bytearray)):
            state.check_text(value, "an output value")
    return value


class BudgetedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with a render budget (see the module docstring). Touching an unsafe
    attribute fails at once: the stock sandbox returns an Undefined that renders as "" and only fails
    when used further; a template that even looks at `__class__` has no business being rendered."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BudgetedCodeGenerator

    def __init__(self, **options: Any) -> None:
        super().__init__(finalize=_finalize, **options)
        self.globals["range"] = _budgeted_range
        self.globals["lipsum"] = _budgeted_lipsum

    def wrap_filters(self) -> None:
        """Put every filter (call after adding the environment's own) behind the budget."""
        for name, func in list(self.filters.items()):
            self.filters[name] = _budgeted_filter(name, func)

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    # ---- compile: tick in every loop
    def compile_budgeted(self, source: str) -> jinja2.Template:
        """Parse, add the loop ticks, compile."""
        tree = self.parse(source)
        for loop in list(tree.find_all(nodes.For)):
            tick = nodes.Call(nodes.EnvironmentAttribute("tl_tick"), [], [], None, None)
            loop.body.insert(0, nodes.ExprStmt(tick).set_lineno(loop.lineno).set_environment(self))
            if loop.test is not None:
                tick = nodes.Call(nodes.EnvironmentAttribute("tl_tick"), [], [], None, None)
                loop.test = nodes.And(tick, loop.test).set_lineno(loop.lineno).set_environment(self)
        return self.from_string(tree)

    # ---- hooks the compiled template calls
    def tl_tick(self) -> bool:
        return _state().tick()

    def tl_join(self, join: Callable[[Any], str], parts: tuple) -> str:
        state = _state()
        state.check_size(sum(_as_text_len(part, state.max_chars) for part in parts), "a '~' concatenation")
        result = join(parts)
        state.charge(result, "a '~' concatenation")
        state.check_time()
        return result

    def concat(self, pieces: Any) -> str:  # type: ignore[override]
        """The buffers of macros, call blocks and `{% set %}...{% endset %}` blocks."""
        state = _STATE.get()
        if state is None:
            return "".join(pieces)
        pieces = list(pieces)
        state.check_size(sum(len(piece) for piece in pieces), "a macro or block's text")
        result = "".join(pieces)
        state.charge(result, "a macro or block's text")
        return result

    def tl_sliced(self, value: Any) -> Any:
        """`x[a:b]` is a copy (jinja slices without the sandbox's getitem): it counts as allocated."""
        state = _STATE.get()
        if state is not None:
            state.charge(value, "a slice")
        return value

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        state = _state()
        state.check_time()
        what = f"'{operator}'"
        if operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                state.check_int(right * abs(left).bit_length(), what)
        elif operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(count, int):
                    state.check_size(len(seq) * count, what)
            if isinstance(left, int) and isinstance(right, int):
                state.check_int(left.bit_length() + right.bit_length(), what)
        elif operator == "+":
            if isinstance(left, (str, bytes, list, tuple)) and isinstance(right, (str, bytes, list, tuple)):
                state.check_size(len(left) + len(right), what)
        elif operator == "%" and isinstance(left, str):
            _check_printf(state, left, right, what)
        result = self.binop_table[operator](left, right)
        state.charge(result, what)
        return result

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        state = _state()
        state.check_time()
        args = _check_method_call(state, __obj, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        state.charge(result, f"the result of {getattr(__obj, '__name__', 'a call')}()")
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        template, name = value.__self__, value.__name__

        def budgeted(*args: Any, **kwargs: Any) -> str:
            state = _state()
            mapping = args[0] if name == "format_map" and args and isinstance(args[0], Mapping) else kwargs
            _check_str_format(state, template, args if name == "format" else (), dict(mapping), f"str.{name}()")
            result = wrapped(*args, **kwargs)
            state.charge(result, f"str.{name}()")
            return result

        return functools.update_wrapper(budgeted, value)


def render_within(
    template: jinja2.Template, budget: RenderBudget, input_chars: int, context: dict[str, Any]
) -> str:
    """Render under a fresh budget, streaming the output and stopping past its cap."""
    state = RenderState(budget, input_chars)
    token = _STATE.set(state)
    stream: Iterator[str] = template.generate(**context)
    try:
        pieces = []
        for piece in stream:
            state.add_output(piece)
            pieces.append(piece)
        return "".join(pieces)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
        _STATE.reset(token)


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
