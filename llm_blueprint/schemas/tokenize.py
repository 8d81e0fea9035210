"""``/tokenize`` and ``/detokenize`` bodies: the shapes vLLM serves (llama.cpp's ``content`` is accepted too)."""

from __future__ import annotations

from marshmallow import ValidationError, fields, pre_load, validate, validates_schema

from .common import RequestSchema, StrictBool, StrictInt, StrictStr
from .openai import ChatMessageSchema, ResponseFormatSchema, ToolChoiceField, ToolSchema


class TokenizeRequestSchema(RequestSchema):
    """Either ``prompt`` (raw text, as /v1/completions encodes it) or ``messages`` (rendered by the chat template,
    as /v1/chat/completions renders them: tools, tool choice and response format change the prompt too)."""

    model = StrictStr(allow_none=True)
    prompt = StrictStr(allow_none=True)
    add_special_tokens = StrictBool(load_default=True, allow_none=True)
    messages = fields.List(fields.Nested(ChatMessageSchema), allow_none=True, validate=validate.Length(min=1))
    tools = fields.List(fields.Nested(ToolSchema), allow_none=True)
    tool_choice = ToolChoiceField(allow_none=True)
    response_format = fields.Nested(ResponseFormatSchema, allow_none=True)
    return_token_strs = StrictBool(load_default=False, allow_none=True)

    @pre_load
    def _llama_cpp_content(self, data, **kwargs):
        if isinstance(data, dict) and "content" in data and "prompt" not in data:  # llama.cpp's name for it
            data = {**data, "prompt": data["content"]}
            data.pop("content")
        return data

    @validates_schema
    def _one_form(self, data, **kwargs):
        if (data.get("prompt") is None) == (data.get("messages") is None):
            raise ValidationError("give either prompt (raw text) or messages (chat)", field_name="prompt")


class DetokenizeRequestSchema(RequestSchema):
    model = StrictStr(allow_none=True)
    tokens = fields.List(StrictInt(validate=validate.Range(0)), required=True)
