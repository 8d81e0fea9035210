"""marshmallow schema for the OpenAI Responses API request body (/v1/responses)."""

from __future__ import annotations

from marshmallow import ValidationError, fields, validate, validates_schema

from .common import RequestSchema, StrictBool, StrictFloat, StrictInt, StrictStr, first_error, join_text_parts
from .tools import ToolList

INPUT_ROLES = ("user", "assistant", "system", "developer")
TEXT_PART_TYPES = frozenset({"input_text", "output_text", "text"})
UNSERVABLE_PARTS = {"input_image": "images", "input_file": "files", "input_audio": "audio"}


def _unsupported_part(kind: str) -> str:
    if kind in UNSERVABLE_PARTS:
        return f"'{kind}' parts are not supported: this model reads text only, not {UNSERVABLE_PARTS[kind]}"
    return f"unsupported content part {kind!r}"


def _message_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    try:
        return join_text_parts(content, text_types=TEXT_PART_TYPES, refusal=True, unsupported=_unsupported_part)
    except ValidationError as exc:  # one readable message for the whole `input` field
        path, message = first_error(exc.messages, f"{where}.content")
        raise ValidationError(f"{path}: {message}") from None


def _string(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value and key != "arguments":
        raise ValidationError(f"{where}.{key}: must be a non-empty string")
    return value


class ResponsesInput(fields.Field):
    """``input``: a string, or a list of items (messages, function calls and their outputs), normalized to
    ``{"type": "message", "role", "content"}``, ``{"type": "function_call", "call_id", "name", "arguments"}``
    and ``{"type": "function_call_output", "call_id", "output"}``."""

    openapi = {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "object"}}]}

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            return [{"type": "message", "role": "user", "content": value}]
        if not isinstance(value, list) or not value:
            raise ValidationError("must be a string or a non-empty list of input items")
        items = []
        for i, item in enumerate(value):
            where = f"input[{i}]"
            if not isinstance(item, dict):
                raise ValidationError(f"{where}: each input item must be an object")
            kind = item.get("type", "message")
            if kind == "reasoning":
                continue  # replayed reasoning carries nothing the prompt needs
            if kind == "function_call":
                namespace = item.get("namespace") if isinstance(item.get("namespace"), str) else ""
                items.append({"type": kind, "call_id": _string(item, "call_id", where),
                              "name": namespace + _string(item, "name", where),
                              "arguments": _string(item, "arguments", where), "where": where})
            elif kind == "function_call_output":
                output = item.get("output")
                if not isinstance(output, str):
                    output = _message_text(output, where)
                items.append({"type": kind, "call_id": _string(item, "call_id", where), "output": output, "where": where})
            elif kind == "message":
                role = item.get("role")
                if role not in INPUT_ROLES:
                    raise ValidationError(f"{where}.role: must be one of {', '.join(INPUT_ROLES)}")
                items.append({"type": kind, "role": "system" if role == "developer" else role,
                              "content": _message_text(item.get("content"), where)})
            else:
                raise ValidationError(f"{where}: unsupported input item type {kind!r}")
        if not items:
            raise ValidationError("contains no message")
        return items


class FunctionToolSchema(RequestSchema):
    type = StrictStr(required=True, validate=validate.OneOf(["function"], error="only function tools are supported"))
    name = StrictStr(required=True)
    description = StrictStr(allow_none=True)
    parameters = fields.Dict(allow_none=True)
    strict = StrictBool(allow_none=True)
    namespace = StrictStr(allow_none=True)  # set for the functions of a Codex namespace (below)


def namespace_tools(tool: dict) -> list[dict] | None:
    """Codex CLI's ``{"type": "namespace", "name", "description", "tools": [function tools]}``: its functions, each
    seen by the model under the namespace's name followed by its own (Codex's wire name, ``mcp__server__`` +
    ``search``), and answered as a function call with ``namespace`` and ``name`` apart, as Codex reads it."""
    if tool.get("type") != "namespace":
        return None
    namespace, inner = tool.get("name"), tool.get("tools")
    if not isinstance(namespace, str) or not isinstance(inner, list):
        raise ValidationError("a namespace tool needs a name and a list of tools")
    return [{**t, "name": f"{namespace}{t.get('name')}", "namespace": namespace}
            if isinstance(t, dict) and t.get("type") == "function" else t for t in inner]


class ToolChoiceField(fields.Field):
    """``tool_choice``: none, auto, required or ``{"type": "function", "name"}``; → (mode, name)."""

    openapi = {"nullable": True, "oneOf": [{"type": "string", "enum": ["none", "auto", "required"]}, {
        "type": "object", "required": ["type", "name"],
        "properties": {"type": {"type": "string", "enum": ["function"]}, "name": {"type": "string"}}}]}

    def _deserialize(self, value, attr, data, **kwargs):
        if value in ("none", "auto", "required"):
            return (value, None)
        if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str):
            return ("required", value["name"])
        raise ValidationError("must be 'none', 'auto', 'required' or {\"type\": \"function\", \"name\": ...}")


class TextFormatSchema(RequestSchema):
    type = StrictStr(required=True, validate=validate.OneOf(["text", "json_object", "json_schema"]))
    name = StrictStr(allow_none=True)
    schema = fields.Dict(allow_none=True)
    strict = StrictBool(allow_none=True)
    description = StrictStr(allow_none=True)

    @validates_schema
    def _schema_given(self, data, **kwargs):
        if data["type"] == "json_schema" and not data.get("schema"):
            raise ValidationError("is required when type is 'json_schema'", field_name="schema")


class TextSchema(RequestSchema):
    format = fields.Nested(TextFormatSchema, allow_none=True)


class ResponsesRequestSchema(RequestSchema):
    model = StrictStr(required=True)
    input = ResponsesInput(required=True)
    instructions = StrictStr(allow_none=True)
    max_output_tokens = StrictInt(allow_none=True, validate=validate.Range(1))
    temperature = StrictFloat(allow_none=True, validate=validate.Range(0, 2))
    top_p = StrictFloat(allow_none=True, validate=validate.Range(0, 1, min_inclusive=False))
    stream = StrictBool(allow_none=True)
    store = StrictBool(allow_none=True)
    previous_response_id = StrictStr(allow_none=True)
    tools = ToolList(FunctionToolSchema(), serves=lambda tool: tool.get("type") == "function", expand=namespace_tools)
    tool_choice = ToolChoiceField(allow_none=True)
    parallel_tool_calls = StrictBool(allow_none=True)
    text = fields.Nested(TextSchema, allow_none=True)
    metadata = fields.Dict(allow_none=True)
    user = StrictStr(allow_none=True)
    # A key that requests sharing a long prefix carry; the prefix up to the last user message is then held in the
    # prompt cache (OpenAI routes by it to a machine with that prefix cached).
    prompt_cache_key = StrictStr(allow_none=True)
    top_logprobs = StrictInt(allow_none=True, validate=validate.Range(0, 20))
    include = fields.List(StrictStr(), allow_none=True)

    @validates_schema
    def _stateless(self, data, **kwargs):
        if data.get("previous_response_id"):
            raise ValidationError("responses are not stored by this server; send the whole conversation in `input`",
                                  field_name="previous_response_id")
        if data.get("store"):
            raise ValidationError("responses are not stored by this server; send store=false (or omit it)", field_name="store")
