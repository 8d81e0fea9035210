"""marshmallow schemas for the OpenAI-compatible request bodies."""

from __future__ import annotations

from marshmallow import ValidationError, fields, validate, validates_schema

from .common import RequestSchema, StrictBool, StrictFloat, StrictInt, StrictStr, StringOrList, join_text_parts
from .tools import ToolList

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
UNSUPPORTED_PART_TYPES = {"image_url": "images", "input_audio": "audio", "file": "files", "refusal": None}


def _unsupported_part(kind: str) -> str:
    what = UNSUPPORTED_PART_TYPES.get(kind) or f"'{kind}' parts"
    return f"content part type '{kind}' is not supported: this model reads text only, not {what}"


SERVER_DEFAULT = {"description": "default: the model's recommendation (generation_config.json) or LLM_DEFAULT_*, else the API's"}

class ChatContent(fields.Field):
    """``content``: a string, null, or a list of text parts, joined into one string."""

    openapi = {"nullable": True, "oneOf": [{"type": "string"}, {"type": "array", "items": {
        "type": "object", "required": ["type"], "properties": {"type": {"type": "string"}, "text": {"type": "string"}}}}]}

    def _deserialize(self, value, attr, data, **kwargs):
        if value is None or isinstance(value, str):
            return value
        return join_text_parts(value, text_types=frozenset({"text"}), refusal=True, unsupported=_unsupported_part)


class CalledFunctionSchema(RequestSchema):
    name = StrictStr(required=True, validate=validate.Length(min=1))
    arguments = StrictStr(required=True)


class ToolCallSchema(RequestSchema):
    """An assistant turn's earlier tool call, replayed in the history."""

    id = StrictStr(required=True, validate=validate.Length(min=1))
    type = StrictStr(load_default="function", validate=validate.OneOf(["function"]))
    function = fields.Nested(CalledFunctionSchema, required=True)


class ChatMessageSchema(RequestSchema):
    role = StrictStr(required=True, validate=validate.OneOf(CHAT_ROLES))
    content = ChatContent(load_default=None, allow_none=True)
    name = StrictStr()
    tool_call_id = StrictStr()
    tool_calls = fields.List(fields.Nested(ToolCallSchema), allow_none=True)

    @validates_schema
    def _content_present(self, data, **kwargs):
        if data.get("tool_calls") and data["role"] != "assistant":
            raise ValidationError("only assistant messages carry tool_calls", field_name="tool_calls")
        if data["role"] == "tool" and not data.get("tool_call_id"):
            raise ValidationError("a tool message needs the tool_call_id of the call it answers", field_name="tool_call_id")
        if data.get("content") is None and not (data["role"] == "assistant" and data.get("tool_calls")):
            raise ValidationError("must be a string or a list of text parts", field_name="content")


class FunctionSchema(RequestSchema):
    name = StrictStr(required=True)
    description = StrictStr(allow_none=True)
    parameters = fields.Dict(allow_none=True)
    strict = StrictBool(allow_none=True)


class ToolSchema(RequestSchema):
    type = StrictStr(required=True, validate=validate.OneOf(["function"], error="only 'function' tools are supported"))
    function = fields.Nested(FunctionSchema, required=True)


class ToolChoiceField(fields.Field):
    """``tool_choice``: none, auto, required, or ``{"type": "function", "function": {"name"}}``; → (mode, name)."""

    openapi = {"nullable": True, "oneOf": [{"type": "string", "enum": ["none", "auto", "required"]}, {
        "type": "object", "required": ["type", "function"], "properties": {
            "type": {"type": "string", "enum": ["function"]},
            "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}}]}

    def _deserialize(self, value, attr, data, **kwargs):
        if value in ("none", "auto", "required"):
            return (value, None)
        if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict) \
                and isinstance(value["function"].get("name"), str):
            return ("required", value["function"]["name"])
        raise ValidationError("must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}")


class JsonSchemaFormatSchema(RequestSchema):
    name = StrictStr(required=True)
    schema = fields.Dict(load_default=None, allow_none=True)
    strict = StrictBool(allow_none=True)
    description = StrictStr(allow_none=True)


class ResponseFormatSchema(RequestSchema):
    type = StrictStr(required=True, validate=validate.OneOf(["text", "json_object", "json_schema"]))
    json_schema = fields.Nested(JsonSchemaFormatSchema, allow_none=True)

    @validates_schema
    def _schema_given(self, data, **kwargs):
        if data["type"] == "json_schema" and not data.get("json_schema"):
            raise ValidationError("is required when type is 'json_schema'", field_name="json_schema")


class StreamOptionsSchema(RequestSchema):
    include_usage = StrictBool(load_default=False)


class SamplingFields(RequestSchema):
    """Fields shared by chat completions and completions."""

    model = StrictStr(required=True)
    # Left out or null: the model's recommended sampling (generation_config.json) or LLM_DEFAULT_*, else the API's default.
    temperature = StrictFloat(allow_none=True, validate=validate.Range(0, 2), metadata=SERVER_DEFAULT)
    top_p = StrictFloat(allow_none=True, validate=validate.Range(0, 1, min_inclusive=False), metadata=SERVER_DEFAULT)
    top_k = StrictInt(allow_none=True, validate=validate.Range(0), metadata=SERVER_DEFAULT)
    repetition_penalty = StrictFloat(allow_none=True, validate=validate.Range(0, min_inclusive=False), metadata=SERVER_DEFAULT)
    min_tokens = StrictInt(load_default=0, allow_none=True, validate=validate.Range(0))
    presence_penalty = StrictFloat(allow_none=True, validate=validate.Range(-2, 2))
    frequency_penalty = StrictFloat(allow_none=True, validate=validate.Range(-2, 2))
    n = StrictInt(load_default=1, allow_none=True, validate=validate.Range(1))
    stop = StringOrList(max_items=4, load_default=list, allow_none=True)
    seed = StrictInt(allow_none=True)
    stream = StrictBool(load_default=False, allow_none=True)
    stream_options = fields.Nested(StreamOptionsSchema, allow_none=True)
    user = StrictStr(allow_none=True)
    # A key that requests sharing a long prefix carry; the prefix up to the last user message is then held in the
    # prompt cache (OpenAI routes by it to a machine with that prefix cached).
    prompt_cache_key = StrictStr(allow_none=True)


class ChatCompletionRequestSchema(SamplingFields):
    messages = fields.List(fields.Nested(ChatMessageSchema), required=True, validate=validate.Length(min=1))
    max_tokens = StrictInt(allow_none=True, validate=validate.Range(1))
    max_completion_tokens = StrictInt(allow_none=True, validate=validate.Range(1))
    logprobs = StrictBool(load_default=False, allow_none=True)
    top_logprobs = StrictInt(allow_none=True, validate=validate.Range(0, 20))
    tools = ToolList(ToolSchema(), serves=lambda tool: tool.get("type") == "function")
    tool_choice = ToolChoiceField(allow_none=True)
    parallel_tool_calls = StrictBool(allow_none=True)
    response_format = fields.Nested(ResponseFormatSchema, allow_none=True)
    reasoning_effort = StrictStr(allow_none=True)


class PromptField(fields.Field):
    """``prompt``: a string, a list of strings, a list of token ids, or a list of such lists."""

    openapi = {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}},
                         {"type": "array", "minItems": 1, "items": {"type": "integer"}},
                         {"type": "array", "minItems": 1, "items": {"type": "array", "minItems": 1, "items": {"type": "integer"}}}]}

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value:
            if all(isinstance(v, str) for v in value):
                return value
            if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                return [value]
            if all(isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v) for v in value):
                return value
        raise ValidationError("must be a string, a list of strings, or token ids")


class CompletionRequestSchema(SamplingFields):
    prompt = PromptField(required=True)
    max_tokens = StrictInt(load_default=16, allow_none=True, validate=validate.Range(1))
    echo = StrictBool(load_default=False, allow_none=True)
    logprobs = StrictInt(allow_none=True, validate=validate.Range(0, 5))
    suffix = StrictStr(allow_none=True)
    best_of = StrictInt(allow_none=True, validate=validate.Range(1))

    @validates_schema
    def _unsupported(self, data, **kwargs):
        if data.get("suffix"):
            raise ValidationError("suffix (fill-in-the-middle) is not supported by this server", field_name="suffix")
        if data.get("best_of") not in (None, data.get("n") or 1):
            raise ValidationError("best_of is not supported; use n", field_name="best_of")
