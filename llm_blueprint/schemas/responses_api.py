"""marshmallow schema for the OpenAI Responses API request body (/v1/responses)."""

from __future__ import annotations

from marshmallow import ValidationError, fields, validate, validates_schema

from .common import RequestSchema, StrictBool, StrictFloat, StrictInt, StrictStr, first_error, join_text_parts

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


class ResponsesInput(fields.Field):
    """``input``: a string, or a list of message items; normalized to ``[{"role", "content"}]``."""

    openapi = {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "object"}}]}

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            return [{"role": "user", "content": value}]
        if not isinstance(value, list) or not value:
            raise ValidationError("must be a string or a non-empty list of input items")
        messages = []
        for i, item in enumerate(value):
            where = f"input[{i}]"
            if not isinstance(item, dict):
                raise ValidationError(f"{where}: each input item must be an object")
            kind = item.get("type", "message")
            if kind == "reasoning":
                continue  # replayed reasoning carries nothing the prompt needs
            if kind in ("function_call", "function_call_output"):
                raise ValidationError(f"{where}: '{kind}' items need tool calling, which this server does not support yet")
            if kind != "message":
                raise ValidationError(f"{where}: unsupported input item type {kind!r}")
            role = item.get("role")
            if role not in INPUT_ROLES:
                raise ValidationError(f"{where}.role: must be one of {', '.join(INPUT_ROLES)}")
            messages.append({"role": "system" if role == "developer" else role, "content": _message_text(item.get("content"), where)})
        if not messages:
            raise ValidationError("contains no message")
        return messages


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
    tools = fields.List(fields.Dict(), allow_none=True)
    tool_choice = fields.Raw(allow_none=True)
    metadata = fields.Dict(allow_none=True)
    user = StrictStr(allow_none=True)

    @validates_schema
    def _stateless(self, data, **kwargs):
        if data.get("previous_response_id"):
            raise ValidationError("responses are not stored by this server; send the whole conversation in `input`",
                                  field_name="previous_response_id")
        if data.get("store"):
            raise ValidationError("responses are not stored by this server; send store=false (or omit it)", field_name="store")
        if data.get("tools"):
            raise ValidationError("tools on /v1/responses are not supported by this server yet", field_name="tools")
