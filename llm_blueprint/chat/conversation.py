"""A protocol-neutral chat request: messages with tool calls and results, tools, tool choice, output format.

Each protocol's route turns its validated body into a :class:`ChatRequest`;
everything after that (prompt, generation, parsing) is shared.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from jsonschema import SchemaError, validators

from ..engine.constraints import json_schema_grammar
from ..errors import InvalidRequest

TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class ToolCallRecord:
    """A tool call made in an earlier assistant turn (history)."""

    id: str
    name: str
    arguments: dict[str, Any]


@dataclass
class Message:
    """One turn. ``role``: system, user, assistant or tool."""

    role: str
    content: str = ""
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    tool_call_id: str | None = None  # role "tool": the call this result answers
    name: str | None = None  # role "tool": the tool's name, when known
    is_error: bool = False  # role "tool": the tool failed (Anthropic's is_error)
    origin: str = ""  # where the client sent it (e.g. "messages[3]"), for error messages


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def openai_shape(self) -> dict[str, Any]:
        """The shape Hugging Face chat templates expect in ``tools``."""
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolChoice:
    """``mode``: none, auto or required; ``name`` forces one tool (mode required)."""

    mode: str = "auto"
    name: str | None = None
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.mode == "required"


@dataclass(frozen=True)
class ResponseFormat:
    """``kind``: json_object or json_schema (with ``schema``)."""

    kind: str
    schema: dict[str, Any] | None = None
    name: str | None = None
    param: str | None = None  # where the request gave the schema, for errors


@dataclass
class ChatRequest:
    messages: list[Message]
    tools: list[Tool] = field(default_factory=list)
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    response_format: ResponseFormat | None = None
    # Whether reasoning (<think>…</think>) is returned to the client; it is parsed out of the answer either way,
    # unless LLM_REASONING is off (then it stays in the text).
    show_reasoning: bool = True
    template_options: dict[str, Any] = field(default_factory=dict)  # e.g. enable_thinking for Qwen-style templates
    # The client's cache points: the prompt cache should keep the state after the first k messages, for each k
    # (Anthropic cache_control breakpoints, OpenAI prompt_cache_key); 0 = the system part (tools) alone.
    cache_marks: tuple[int, ...] = ()

    @property
    def active_tools(self) -> list[Tool]:
        """The tools the model may call now (none with tool_choice "none")."""
        return [] if self.tool_choice.mode == "none" else self.tools

    def tool(self, name: str) -> Tool | None:
        return next((t for t in self.tools if t.name == name), None)


def check_json_schema(schema: Any, param: str, object_only: bool = False) -> None:
    """A 400 unless ``schema`` is a valid JSON Schema document (an object)."""
    if not isinstance(schema, dict):
        raise InvalidRequest(f"'{param}' must be a JSON Schema object", param=param)
    try:
        validators.validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        raise InvalidRequest(f"'{param}' is not a valid JSON Schema: {exc.message}", param=param) from None
    if object_only and schema.get("type", "object") != "object":
        raise InvalidRequest(f"'{param}': a tool's parameters must be a JSON Schema of type 'object'", param=param)


def make_tools(specs: list[tuple[str, str, Any, str]], schema_field: str = "parameters") -> list[Tool]:
    """Validated tools from ``(name, description, parameters, param_path)`` tuples."""
    tools, seen = [], set()
    for name, description, parameters, where in specs:
        if not TOOL_NAME.match(name):
            raise InvalidRequest(f"tool names must be 1-64 letters, digits, '_', '.' or '-'; got {name!r}", param=where)
        if name in seen:
            raise InvalidRequest(f"tool name {name!r} is given twice", param=where)
        seen.add(name)
        parameters = {"type": "object", "properties": {}} if parameters is None else parameters
        check_json_schema(parameters, f"{where}.{schema_field}", object_only=True)
        tools.append(Tool(name, description or "", parameters))
    return tools


def response_format(kind: str | None, schema: dict[str, Any] | None, name: str | None, param: str) -> ResponseFormat | None:
    """``text`` (None), ``json_object`` or ``json_schema`` with a checked schema."""
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return ResponseFormat("json_object", {"type": "object"})
    check_json_schema(schema, param)
    return ResponseFormat("json_schema", schema, name, param)


def chat_request(messages: list[Message], tools: list[Tool], choice: ToolChoice, fmt: ResponseFormat | None = None,
                 **options: Any) -> ChatRequest:
    """The neutral request every protocol builds, with its cross-field checks; ``options``: other ChatRequest fields."""
    check_choice(choice, tools)
    if fmt is not None and choice.forced:
        raise InvalidRequest("a JSON response format cannot be combined with a forced tool call", param="tool_choice")
    # Structured output is enforced token by token: a schema the matcher cannot enforce is refused, by name.
    if fmt is not None:
        json_schema_grammar(fmt.schema, fmt.param)
    for tool in tools if choice.forced else ():
        if choice.name in (None, tool.name):
            try:
                json_schema_grammar(tool.parameters)
            except InvalidRequest as exc:
                raise InvalidRequest(f"tool {tool.name!r}: {exc.message}", param="tools") from None
    return ChatRequest(messages, tools, choice, fmt, **options)


def check_choice(choice: ToolChoice, tools: list[Tool], param: str = "tool_choice") -> None:
    """The tool choice names an available tool, and forces a call only when there are tools."""
    if choice.forced and not tools:
        raise InvalidRequest("tool_choice requires a tool call, but no tools were given", param=param)
    if choice.name is not None and all(t.name != choice.name for t in tools):
        raise InvalidRequest(f"tool_choice names the tool {choice.name!r}, which is not among the request's tools", param=param)


def check_tool_history(messages: list[Message]) -> None:
    """Every tool result must answer a call made earlier in the conversation."""
    calls: dict[str, str] = {}
    for message in messages:
        for call in message.tool_calls:
            calls[call.id] = call.name
        if message.role == "tool":
            if message.tool_call_id not in calls:
                raise InvalidRequest(
                    f"the tool result in {message.origin or 'messages'} answers tool call id {message.tool_call_id!r}, "
                    "but no earlier assistant turn made a call with that id", param=message.origin or "messages")
            message.name = message.name or calls[message.tool_call_id]


def arguments_object(text: str, param: str) -> dict[str, Any]:
    """Tool-call arguments replayed by a client: a JSON object, as text or already parsed."""
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        raise InvalidRequest("tool call arguments must be a JSON object (as text)", param=param) from None
    if not isinstance(value, dict):
        raise InvalidRequest("tool call arguments must be a JSON object", param=param)
    return value
