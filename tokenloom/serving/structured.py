"""Structured output on the OpenAI routes (L6): response_format, vLLM's guided_* fields, and tools with
tool_choice, mapped onto SamplingParams' json_schema / regex / choice / grammar; tool calls parsed
back out of the constrained output into OpenAI's shape."""

from __future__ import annotations

import json
import uuid
from typing import Any

from tokenloom.serving.errors import ApiError
from tokenloom.serving.protocol import _OpenAISampling

_GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def structured_fields(req: _OpenAISampling, tool_schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """The SamplingParams structured-output field the request asks for ({} for none); a request that
    asks for two, or a malformed response_format, is a 400 naming the parameter."""
    asked: dict[str, tuple[str, Any]] = {}  # request parameter -> (SamplingParams field, value)
    fmt = req.response_format
    if fmt is not None:
        kind = fmt.get("type", "text")
        if kind == "json_object":
            asked["response_format"] = ("json_schema", {"type": "object"})
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise ApiError(400, "response_format.json_schema must be an object {\"name\": ..., \"schema\": {...}}",
                               param="response_format")
            asked["response_format"] = ("json_schema", spec.get("schema", {"type": "object"}))
        elif kind != "text":
            raise ApiError(400, f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                           param="response_format")
    for name, field in _GUIDED.items():
        value = getattr(req, name, None)
        if value is not None:
            if name == "guided_json" and isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError as exc:
                    raise ApiError(400, f"guided_json is not valid JSON: {exc}", param="guided_json") from None
            asked[name] = (field, value)
    if tool_schema is not None:
        asked["tool_choice"] = ("json_schema", tool_schema)
    if len(asked) > 1:
        names = sorted(asked)
        raise ApiError(400, f"only one structured-output constraint may be given, got {' and '.join(names)}",
                       param=names[1])
    return {field: value for field, value in asked.values()}


_TGI_GRAMMAR_HINT = ('grammar must be {"type": "json", "value": <JSON schema>}, {"type": "json_schema", '
                     '"value": {"name": ..., "schema": <JSON schema>}} or {"type": "regex", "value": <regex>}')


def tgi_grammar_fields(grammar: Any) -> dict[str, Any]:
    """TGI's `parameters.grammar` as SamplingParams' json_schema or regex ({} for none); a malformed one
    is a 422 (TGI's status for invalid parameters) naming `grammar`."""
    if grammar is None:
        return {}
    if not isinstance(grammar, dict) or set(grammar) - {"type", "value"} or "value" not in grammar:
        raise ApiError(422, _TGI_GRAMMAR_HINT, param="grammar")
    kind, value = grammar.get("type"), grammar["value"]
    if kind in ("json", "json_object"):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ApiError(422, f"grammar.value is not valid JSON: {exc}", param="grammar") from None
        if not isinstance(value, dict):
            raise ApiError(422, _TGI_GRAMMAR_HINT, param="grammar")
        return {"json_schema": value}
    if kind == "json_schema":
        if not isinstance(value, dict) or not isinstance(value.get("schema"), dict):
            raise ApiError(422, _TGI_GRAMMAR_HINT, param="grammar")
        return {"json_schema": value["schema"]}
    if kind == "regex":
        if not isinstance(value, str):
            raise ApiError(422, _TGI_GRAMMAR_HINT, param="grammar")
        return {"regex": value}
    raise ApiError(422, f"grammar.type must be 'json', 'json_schema' or 'regex', got {kind!r}", param="grammar")


def structured_names(req: _OpenAISampling) -> dict[str, str]:
    """SamplingParams field -> the request parameter that set it, for error messages."""
    names = {field: name for name, field in _GUIDED.items() if getattr(req, name, None) is not None}
    if req.response_format is not None and req.response_format.get("type", "text") != "text":
        names["json_schema"] = "response_format"
    if getattr(req, "tool_choice", None) not in (None, "none", "auto") and req.tools:
        names["json_schema"] = "tools"
    return names


# ---- tools -----------------------------------------------------------------------------------


def _functions(tools: list[Any]) -> dict[str, dict[str, Any]]:
    """name -> the function spec of each tool; a malformed tool is a 400."""
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str) or not function["name"]:
            raise ApiError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': "
                           "{...}}}}}", param="tools")
        parameters = function.get("parameters", {"type": "object"})
        if not isinstance(parameters, dict):
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
        functions[function["name"]] = {**function, "parameters": parameters}
    return functions


class ToolPlan:
    """How a chat request with tools is decoded. `schema`: the JSON schema the output must follow (None:
    unconstrained, for tool_choice "none" and "auto"); `named`: the one function tool_choice names."""

    def __init__(self, tools: list[Any] | None, tool_choice: Any, parallel_tool_calls: bool | None) -> None:
        self.functions = _functions(tools or [])
        self.named: str | None = None
        self.schema: dict[str, Any] | None = None
        choice = tool_choice if tool_choice is not None else ("auto" if self.functions else "none")
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
            if name not in self.functions:
                raise ApiError(400, f"tool_choice names the function {name!r}, which is not in tools "
                               f"({', '.join(self.functions) or 'none given'})", param="tool_choice")
            self.named = name
            self.schema = self.functions[name]["parameters"]
        elif choice == "required":
            if not self.functions:
                raise ApiError(400, "tool_choice 'required' needs tools", param="tool_choice")
            call = [{
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": f["parameters"]},
                "required": ["name", "arguments"], "additionalProperties": False,
            } for name, f in self.functions.items()]
            self.schema = {"type": "array", "items": call[0] if len(call) == 1 else {"anyOf": call}, "minItems": 1}
            if parallel_tool_calls is False:
                self.schema["maxItems"] = 1
        elif choice not in ("auto", "none"):
            raise ApiError(400, f"tool_choice must be 'none', 'auto', 'required' or "
                           f"{{'type': 'function', 'function': {{'name': ...}}}}, got {choice!r}", param="tool_choice")
        self.choice = choice

    @property
    def is_active(self) -> bool:
        return bool(self.functions) and self.choice != "none"

    def tool_calls(self, text: str) -> list[dict[str, Any]] | None:
        """The OpenAI tool_calls the output `text` makes, or None when it makes none (then it is content)."""
        if not self.is_active:
            return None
        try:
            value = json.loads(text)
        except ValueError:
            if self.choice == "auto":
                value = _embedded_json(text)
                if value is None:
                    return None
            else:
                return None  # the output was cut short (max_tokens) before the grammar completed
        if self.named is not None:
            calls = [(self.named, value)]
        else:
            items = value if isinstance(value, list) else [value]
            calls = [(item.get("name"), item.get("arguments", item.get("parameters", {})))
                     for item in items if isinstance(item, dict)]
            calls = [(name, args) for name, args in calls if name in self.functions]
            if not calls:
                return None
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
                for name, args in calls]


def _embedded_json(text: str) -> Any:
    """A JSON value wrapped in a tool-call tag or a code fence (what tool-trained models write)."""
    for start, end in (("<tool_call>", "</tool_call>"), ("```json", "```"), ("```", "```")):
        head = text.find(start)
        if head >= 0:
            tail = text.find(end, head + len(start))
            body = text[head + len(start): tail if tail >= 0 else len(text)]
            try:
                return json.loads(body)
            except ValueError:
                continue
    return None


def tools_system_text(functions: dict[str, dict[str, Any]]) -> str:
    """The tools described for a chat template that does not render them itself."""
    specs = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions.values())
    return ("You may call functions. Available functions:\n" + specs +
            '\nTo call functions, reply with JSON: [{"name": <function name>, "arguments": <arguments object>}]')


def tool_calls_as_content(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For a chat template that does not render tool calls: an assistant message's tool_calls written as
    its content, in the shape the tools system text asks for."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if message.get("role") == "assistant" and calls and not message.get("content"):
            listed = []
            for call in calls:
                function = call.get("function", {}) if isinstance(call, dict) else {}
                arguments = function.get("arguments", "{}")
                try:
                    arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
                except ValueError:
                    pass
                listed.append({"name": function.get("name"), "arguments": arguments})
            message = {**message, "content": json.dumps(listed, ensure_ascii=False)}
        out.append(message)
    return out
