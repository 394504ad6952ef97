"""Chat templates: Jinja rendered in a sandbox, the same way transformers renders them.

Templates come from model repositories (and, on a server, from requests), so they are untrusted code.
They run in jinja2's `ImmutableSandboxedEnvironment` with the globals and filters transformers provides
(`raise_exception`, `strftime_now`, a `tojson` that does not HTML-escape, loop controls,
`{% generation %}` blocks), under a render budget (`chat_template_budget`: time, loop iterations,
output and value sizes). Any attempt to reach Python internals, and any overrun, raises
`ChatTemplateError`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError, UndefinedError

from tokenloom.chat_template_budget import DEFAULT_BUDGET, RenderBudget, input_size
from tokenloom.chat_template_sandbox import BudgetedSandbox, render_within
from tokenloom.errors import ChatTemplateError

_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_RENDER_FAILURES = (
    TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, ZeroDivisionError, RecursionError,
    MemoryError, LookupError, ArithmeticError, UnicodeError,
)


class _TemplateRaised(TemplateError):
    """Raised by the template's own `raise_exception(...)` call."""


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text; here it renders its body as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    """`dict(...)` for templates without exposing the `dict` type itself (as transformers does)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A jinja namespace that refuses underscore-prefixed attribute names."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja's Namespace signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot store underscore-prefixed attributes on a namespace: {name!r}")


def _raise_exception(message: Any) -> None:
    raise _TemplateRaised(str(message))


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # jinja's own tojson HTML-escapes; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _new_environment() -> BudgetedSandbox:
    env = BudgetedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.wrap_filters()
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


class ChatTemplate:
    """One compiled chat template. Compile once (see `compile_chat_template`), render many times."""

    def __init__(self, source: str, budget: RenderBudget = DEFAULT_BUDGET) -> None:
        if not isinstance(source, str):
            raise ChatTemplateError(f"a chat template must be a string, got {type(source).__name__}")
        if len(source) > budget.max_template_chars:
            raise ChatTemplateError(
                f"the chat template is {len(source)} characters long, over the limit of "
                f"{budget.max_template_chars} (max_template_chars); real templates are a few kilobytes"
            )
        self.source = source
        self.budget = budget
        try:
            self._template = _new_environment().compile_budgeted(source)
        except TemplateSyntaxError as exc:
            raise ChatTemplateError(f"chat template has a syntax error at line {exc.lineno}: {exc.message}") from exc
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template cannot be compiled: {exc}") from exc
        except (RecursionError, MemoryError, SyntaxError, ValueError, OverflowError) as exc:
            raise ChatTemplateError(
                f"chat template cannot be compiled ({type(exc).__name__}: {exc}); it nests too deeply or is malformed"
            ) from exc

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        special_tokens: Mapping[str, str] | None = None,
        budget: RenderBudget | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render one conversation to text.

        messages: dicts (or dataclasses / pydantic models) with "role" and "content".
        special_tokens: e.g. {"bos_token": ..., "eos_token": ...}; template_kwargs override them.
        continue_final_message: leave the last message open (True means its "content"; a string names
        another field) so the model continues it; cannot be combined with add_generation_prompt.
        budget: the render's limits (the template's own, `DEFAULT_BUDGET` unless given, when None).
        """
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError(
                "continue_final_message and add_generation_prompt cannot both be set: use add_generation_prompt "
                "to start a new assistant message, continue_final_message to continue the last one"
            )
        try:
            chat = _plain_template_data(normalize_messages(messages))
            if not chat:
                raise ChatTemplateError(
                    "cannot apply a chat template to an empty conversation; give at least one message"
                )
            chat = _alias_reasoning_fields(chat)
            tool_schemas = _check_tools(tools)
            if documents is not None and not all(isinstance(d, Mapping) for d in documents):
                raise ChatTemplateError("documents must be a list of dicts with 'title' and 'text' keys")
            context = _plain_template_data({**(special_tokens or {}), **template_kwargs})
            plain_documents = _plain_template_data(documents)
        except RecursionError as exc:
            raise ChatTemplateError(
                "the messages, tools or documents given to the chat template nest too deeply"
            ) from exc

        reserved = sorted({"messages", "tools", "documents", "add_generation_prompt"} & set(context))
        if reserved:
            raise ChatTemplateError(f"template keyword argument(s) {', '.join(reserved)} clash with the chat's own")
        final_message: Any = None
        if continue_final_message:
            final_message = self._tag_final_message(chat, continue_final_message)
        data = {
            "messages": chat,
            "tools": tool_schemas,
            "documents": plain_documents,
            "add_generation_prompt": add_generation_prompt,
            **context,
        }
        try:
            rendered = render_within(self._template, budget or self.budget, input_size(data), data)
        except ChatTemplateError:
            raise
        except SecurityError as exc:
            raise ChatTemplateError(f"chat template blocked by the sandbox: {exc}") from exc
        except _TemplateRaised as exc:
            raise ChatTemplateError(f"chat template raised an error: {exc}") from exc
        except UndefinedError as exc:
            raise ChatTemplateError(f"chat template used an undefined value: {exc}") from exc
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc
        except _RENDER_FAILURES as exc:
            raise ChatTemplateError(f"chat template failed while rendering: {type(exc).__name__}: {exc}") from exc
        if continue_final_message:
            rendered = _cut_at_continue_tag(rendered, final_message)
        return rendered

    def _tag_final_message(self, chat: list[dict], continue_final_message: bool | str) -> Any:
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        last = chat[-1]
        final_message = last.get(field)
        if final_message is None:
            raise ChatTemplateError(f'continue_final_message is set but the final message has no "{field}" to continue')
        fields = [field]
        if field in _REASONING_FIELDS:
            fields = [name for name in _REASONING_FIELDS if last.get(name) == final_message]
        if not any(name in self.source for name in fields):
            raise ChatTemplateError(
                f'continue_final_message is set to "{field}" but the chat template never reads that field'
            )
        if isinstance(final_message, (list, tuple)):
            for block in reversed(final_message):
                if isinstance(block, dict) and "text" in block:
                    final_message = block["text"]
                    block["text"] = block["text"] + _CONTINUE_TAG
                    return final_message
            raise ChatTemplateError("continue_final_message is set but the final message has no text to continue")
        for name in fields:
            last[name] = last[name] + _CONTINUE_TAG
        return final_message


def _cut_at_continue_tag(rendered: str, final_message: Any) -> str:
    tag = _CONTINUE_TAG.strip()
    if str(final_message).strip() not in rendered or tag not in rendered:
        raise ChatTemplateError(
            "continue_final_message is set but the final message does not appear in the rendered chat; "
            "the chat template changes or drops it"
        )
    at = rendered.rindex(tag)
    if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()  # the template trimmed trailing space after the message


@lru_cache(maxsize=32)
def compile_chat_template(source: str) -> ChatTemplate:
    """Compile `source` once; later calls with the same text return the same `ChatTemplate`."""
    return ChatTemplate(source)


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Messages as plain dicts, as transformers sees them: objects become dicts, None values are dropped."""
    messages = _objects_to_dicts(getattr(messages, "messages", messages))
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    normalized = []
    for message in messages:
        if not isinstance(message, dict):
            raise ChatTemplateError(f"chat messages must be dicts, dataclasses or pydantic models, got {message!r}")
        normalized.append({key: value for key, value in message.items() if value is not None})
    return normalized


def _objects_to_dicts(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _objects_to_dicts(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_objects_to_dicts(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_objects_to_dicts(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _objects_to_dicts(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _objects_to_dicts(value.model_dump())
    return value


def _plain_template_data(value: Any) -> Any:
    """Rebuild what the template sees out of plain JSON types, so no rich object's methods reach it."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_template_data(k): _plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_template_data(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain_template_data(item) for item in value)
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        return _plain_template_data(value.item())  # numpy scalars; np.bool_(False) must stay falsy
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain_template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning_fields(chat: list[dict]) -> list[dict]:
    aliased = []
    for message in chat:
        reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased


def _check_tools(tools: Sequence[Any] | None) -> list[Any] | None:
    if tools is None:
        return None
    schemas = []
    for tool in tools:
        if not isinstance(tool, Mapping):
            raise ChatTemplateError(
                f"tools must be JSON-schema dicts ({{'type': 'function', 'function': {{...}}}}), got {type(tool).__name__}"
            )
        schemas.append(tool)
    return _plain_template_data(schemas)
