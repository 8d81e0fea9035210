"""marshmallow schemas for the Anthropic Messages API request bodies."""

from __future__ import annotations

from marshmallow import ValidationError, fields, validate

from .common import RequestSchema, StrictBool, StrictFloat, StrictInt, StrictStr, join_text_parts

UNSERVABLE_BLOCKS = {
    "image": "image blocks are not supported: this model reads text only",
    "document": "document blocks are not supported: this model reads text only",
    "search_result": "search_result blocks are not supported by this server",
}
# Blocks a client replays from earlier turns that carry nothing the prompt needs.
IGNORED_BLOCKS = {"thinking", "redacted_thinking"}


def _text_blocks(value, what: str) -> str:
    if isinstance(value, str):
        return value
    return join_text_parts(
        value, text_types=frozenset({"text"}), ignored=frozenset(IGNORED_BLOCKS),
        unsupported=lambda kind: UNSERVABLE_BLOCKS.get(kind, f"content block type '{kind}' is not supported"),
        separator="\n\n" if what == "system" else "",
    )


_BLOCKS = {"type": "array", "items": {"type": "object", "required": ["type"],
                                     "properties": {"type": {"type": "string"}, "text": {"type": "string"}}}}


class MessageContent(fields.Field):
    openapi = {"oneOf": [{"type": "string"}, _BLOCKS]}

    def _deserialize(self, value, attr, data, **kwargs):
        return _text_blocks(value, "content")


class SystemPrompt(fields.Field):
    openapi = {"nullable": True, "oneOf": [{"type": "string"}, _BLOCKS]}

    def _deserialize(self, value, attr, data, **kwargs):
        return _text_blocks(value, "system")


def _valid_role(role: str) -> None:
    if role == "system":
        raise ValidationError(
            'Unexpected role "system". The Messages API accepts a top-level `system` parameter, '
            'not "system" as an input message role.')
    if role not in ("user", "assistant"):
        raise ValidationError(f"role must be 'user' or 'assistant', not {role!r}")


class MessageSchema(RequestSchema):
    role = StrictStr(required=True, validate=_valid_role)
    content = MessageContent(required=True)


class CountTokensSchema(RequestSchema):
    model = StrictStr(required=True)
    messages = fields.List(fields.Nested(MessageSchema), required=True, validate=validate.Length(min=1))
    system = SystemPrompt(allow_none=True)


class MessagesRequestSchema(CountTokensSchema):
    max_tokens = StrictInt(required=True, validate=validate.Range(1))
    stop_sequences = fields.List(StrictStr(), allow_none=True)
    temperature = StrictFloat(allow_none=True, validate=validate.Range(0, 1))
    top_p = StrictFloat(allow_none=True, validate=validate.Range(0, 1, min_inclusive=False))
    top_k = StrictInt(allow_none=True, validate=validate.Range(0))
    metadata = fields.Dict(allow_none=True)
    stream = StrictBool(allow_none=True)
