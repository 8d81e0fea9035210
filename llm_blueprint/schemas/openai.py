"""marshmallow schemas for the OpenAI-compatible request bodies."""

from __future__ import annotations

from marshmallow import ValidationError, fields, validate, validates_schema

from .common import RequestSchema, StrictBool, StrictFloat, StrictInt, StrictStr, StringOrList, join_text_parts

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
UNSUPPORTED_PART_TYPES = {"image_url": "images", "input_audio": "audio", "file": "files", "refusal": None}


def _unsupported_part(kind: str) -> str:
    what = UNSUPPORTED_PART_TYPES.get(kind) or f"'{kind}' parts"
    return f"content part type '{kind}' is not supported: this model reads text only, not {what}"


class ChatContent(fields.Field):
    """``content``: a string, null, or a list of text parts, joined into one string."""

    openapi = {"nullable": True, "oneOf": [{"type": "string"}, {"type": "array", "items": {
        "type": "object", "required": ["type"], "properties": {"type": {"type": "string"}, "text": {"type": "string"}}}}]}

    def _deserialize(self, value, attr, data, **kwargs):
        if value is None or isinstance(value, str):
            return value
        return join_text_parts(value, text_types=frozenset({"text"}), refusal=True, unsupported=_unsupported_part)


class ChatMessageSchema(RequestSchema):
    role = StrictStr(required=True, validate=validate.OneOf(CHAT_ROLES))
    content = ChatContent(load_default=None, allow_none=True)
    name = StrictStr()
    tool_call_id = StrictStr()
    tool_calls = fields.List(fields.Dict())

    @validates_schema
    def _content_present(self, data, **kwargs):
        if data.get("content") is None and not (data["role"] == "assistant" and data.get("tool_calls")):
            raise ValidationError("must be a string or a list of text parts", field_name="content")


class StreamOptionsSchema(RequestSchema):
    include_usage = StrictBool(load_default=False)


class SamplingFields(RequestSchema):
    """Fields shared by chat completions and completions."""

    model = StrictStr(required=True)
    temperature = StrictFloat(load_default=1.0, allow_none=True, validate=validate.Range(0, 2))
    top_p = StrictFloat(load_default=1.0, allow_none=True, validate=validate.Range(0, 1, min_inclusive=False))
    top_k = StrictInt(load_default=0, allow_none=True, validate=validate.Range(0))
    repetition_penalty = StrictFloat(load_default=1.0, allow_none=True, validate=validate.Range(0, min_inclusive=False))
    min_tokens = StrictInt(load_default=0, allow_none=True, validate=validate.Range(0))
    presence_penalty = StrictFloat(allow_none=True, validate=validate.Range(-2, 2))
    frequency_penalty = StrictFloat(allow_none=True, validate=validate.Range(-2, 2))
    n = StrictInt(load_default=1, allow_none=True, validate=validate.Range(1))
    stop = StringOrList(max_items=4, load_default=list, allow_none=True)
    seed = StrictInt(allow_none=True)
    stream = StrictBool(load_default=False, allow_none=True)
    stream_options = fields.Nested(StreamOptionsSchema, allow_none=True)
    user = StrictStr(allow_none=True)


class ChatCompletionRequestSchema(SamplingFields):
    messages = fields.List(fields.Nested(ChatMessageSchema), required=True, validate=validate.Length(min=1))
    max_tokens = StrictInt(allow_none=True, validate=validate.Range(1))
    max_completion_tokens = StrictInt(allow_none=True, validate=validate.Range(1))
    logprobs = StrictBool(load_default=False, allow_none=True)
    top_logprobs = StrictInt(allow_none=True, validate=validate.Range(0, 20))


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
