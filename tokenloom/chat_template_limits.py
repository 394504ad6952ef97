"""What chat-template operations would build, estimated before they run (the render budget's checks
of printf / str.format widths, of amplifying string methods and filters), and the budgeted globals."""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Callable, Mapping
from typing import Any

import jinja2.utils
from jinja2.sandbox import MAX_RANGE

from tokenloom.chat_template_budget import (
    RenderState,
    current_state,
    is_container,
    over_budget,
    text_length,
    text_size,
)
from tokenloom.errors import ChatTemplateError

# printf-style conversions: their widths and precisions
_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[diouxXeEfFgGcrsab%]")


def check_printf(state: RenderState, template: str, args: Any, what: str) -> None:
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


def check_str_format(state: RenderState, template: str, args: tuple, kwargs: dict, what: str) -> None:
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


def check_method_call(state: RenderState, obj: Any, args: tuple, kwargs: dict) -> tuple:
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
    state.check_size(text_length(value, state.max_chars) + lines * max(per_line, 0), "filter 'indent'")


def _filter_wordwrap(state: RenderState, value: Any, args: tuple, kwargs: dict) -> None:
    width = _arg(args, kwargs, 0, "width", 79)
    wrapstring = _arg(args, kwargs, 2, "wrapstring") or "\n"
    length = text_length(value, state.max_chars)
    if isinstance(width, int) and width > 0 and isinstance(wrapstring, str):
        newlines = value.count("\n") if isinstance(value, str) else 0
        state.check_size(length + (length // width + newlines + 1) * len(wrapstring), "filter 'wordwrap'")


def _filter_format(state: RenderState, value: Any, args: tuple, kwargs: dict) -> None:
    if isinstance(value, str):
        check_printf(state, value, kwargs if kwargs else tuple(args), "filter 'format'")


def _filter_replace(state: RenderState, value: Any, args: tuple, kwargs: dict) -> None:
    old, new = _arg(args, kwargs, 0, "old"), _arg(args, kwargs, 1, "new")
    size = _replace_size(value, old, new, _arg(args, kwargs, 2, "count"))
    if not size and isinstance(new, str):  # jinja str()s the operands
        text = text_length(value, state.max_chars)
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


def budgeted_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    offset = 1 if jinja2.utils._PassArg.from_obj(func) is not None else 0
    check = _FILTER_CHECKS.get(name)
    what = f"filter {name!r}"

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        state = current_state()
        state.check_time()
        value = args[offset] if len(args) > offset else None
        if name == "join" and value is not None and not hasattr(value, "__len__"):
            value = _take(state, value, what)
            args = (*args[:offset], value, *args[offset + 1 :])
        if check is not None:
            check(state, value, args[offset + 1 :], kwargs)
        if name in _STRINGIFYING and (is_container(value) or isinstance(value, (bytes, int))):
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


def budgeted_range(*args: int) -> range:
    rng = range(*args)
    state = current_state()
    if len(rng) > MAX_RANGE:
        raise over_budget(f"Range too big: range() of {len(rng)} items", "MAX_RANGE", MAX_RANGE)
    remaining = state.max_iterations - state.iterations
    if len(rng) > remaining:
        raise over_budget(
            f"range() of {len(rng)} items with {remaining} loop iterations left", "max_loop_iterations",
            state.max_iterations,
        )
    return rng


def budgeted_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    state = current_state()
    state.check_count(n, "lipsum(n)")
    state.check_count(max, "lipsum(max)")
    state.check_size(n * max * 12, "lipsum()")
    return jinja2.utils.generate_lorem_ipsum(n=n, html=html, min=min, max=max)


