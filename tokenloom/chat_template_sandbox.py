"""The sandbox chat templates render in: jinja's immutable sandbox whose compiled code goes through the
render budget (chat_template_budget) at every operator, call, filter, concatenation, slice, loop
iteration and output piece."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jinja2
import jinja2.nodes as nodes
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenloom.chat_template_budget import (
    STATE,
    RenderBudget,
    RenderState,
    current_state,
    is_container,
    text_length,
)
from tokenloom.chat_template_limits import (
    budgeted_filter,
    budgeted_lipsum,
    budgeted_range,
    check_method_call,
    check_printf,
    check_str_format,
)


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
    state = STATE.get()
    if state is not None and not isinstance(value, str):
        if is_container(value) or isinstance(value, (bytes, bytearray)):
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
        self.globals["range"] = budgeted_range
        self.globals["lipsum"] = budgeted_lipsum

    def wrap_filters(self) -> None:
        """Put every filter (call after adding the environment's own) behind the budget."""
        for name, func in list(self.filters.items()):
            self.filters[name] = budgeted_filter(name, func)

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
        return current_state().tick()

    def tl_join(self, join: Callable[[Any], str], parts: tuple) -> str:
        state = current_state()
        state.check_size(sum(text_length(part, state.max_chars) for part in parts), "a '~' concatenation")
        result = join(parts)
        state.charge(result, "a '~' concatenation")
        state.check_time()
        return result

    def concat(self, pieces: Any) -> str:  # type: ignore[override]
        """The buffers of macros, call blocks and `{% set %}...{% endset %}` blocks."""
        state = STATE.get()
        if state is None:
            return "".join(pieces)
        pieces = list(pieces)
        state.check_size(sum(len(piece) for piece in pieces), "a macro or block's text")
        result = "".join(pieces)
        state.charge(result, "a macro or block's text")
        return result

    def tl_sliced(self, value: Any) -> Any:
        """`x[a:b]` is a copy (jinja slices without the sandbox's getitem): it counts as allocated."""
        state = STATE.get()
        if state is not None:
            state.charge(value, "a slice")
        return value

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        state = current_state()
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
            check_printf(state, left, right, what)
        result = self.binop_table[operator](left, right)
        state.charge(result, what)
        return result

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        state = current_state()
        state.check_time()
        args = check_method_call(state, __obj, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        state.charge(result, f"the result of {getattr(__obj, '__name__', 'a call')}()")
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        template, name = value.__self__, value.__name__

        def budgeted(*args: Any, **kwargs: Any) -> str:
            state = current_state()
            mapping = args[0] if name == "format_map" and args and isinstance(args[0], Mapping) else kwargs
            check_str_format(state, template, args if name == "format" else (), dict(mapping), f"str.{name}()")
            result = wrapped(*args, **kwargs)
            state.charge(result, f"str.{name}()")
            return result

        return functools.update_wrapper(budgeted, value)


def render_within(
    template: jinja2.Template, budget: RenderBudget, input_chars: int, context: dict[str, Any]
) -> str:
    """Render under a fresh budget, streaming the output and stopping past its cap."""
    state = RenderState(budget, input_chars)
    token = STATE.set(state)
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
        STATE.reset(token)
