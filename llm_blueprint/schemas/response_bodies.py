"""Response shapes, as marshmallow schemas, for the OpenAPI document (the routes build plain dicts)."""

from __future__ import annotations

from marshmallow import INCLUDE, Schema, fields


class ResponseSchema(Schema):
    """Responses may carry more fields than documented (as the public APIs' do)."""

    class Meta:
        unknown = INCLUDE


class OpenAIErrorBody(ResponseSchema):
    message = fields.String(required=True)
    type = fields.String(required=True)
    param = fields.String(required=True, allow_none=True)
    code = fields.String(required=True, allow_none=True)


class OpenAIError(ResponseSchema):
    error = fields.Nested(OpenAIErrorBody, required=True)


class PromptTokensDetails(ResponseSchema):
    cached_tokens = fields.Integer(required=True)  # read from the prompt cache
    cache_write_tokens = fields.Integer(required=True)  # stored in the prompt cache by this request


class Usage(ResponseSchema):
    prompt_tokens = fields.Integer(required=True)
    completion_tokens = fields.Integer(required=True)
    total_tokens = fields.Integer(required=True)
    prompt_tokens_details = fields.Nested(PromptTokensDetails, required=True)


class ChatMessageOut(ResponseSchema):
    role = fields.String(required=True)
    content = fields.String(required=True, allow_none=True)


class ChatChoice(ResponseSchema):
    index = fields.Integer(required=True)
    message = fields.Nested(ChatMessageOut, required=True)
    logprobs = fields.Dict(required=True, allow_none=True)
    finish_reason = fields.String(required=True)


class _CompletionEnvelope(ResponseSchema):
    id = fields.String(required=True)
    object = fields.String(required=True)
    created = fields.Integer(required=True)
    model = fields.String(required=True)
    usage = fields.Nested(Usage, required=True)


class ChatCompletion(_CompletionEnvelope):
    choices = fields.List(fields.Nested(ChatChoice), required=True)


class TextChoice(ResponseSchema):
    index = fields.Integer(required=True)
    text = fields.String(required=True)
    logprobs = fields.Dict(required=True, allow_none=True)
    finish_reason = fields.String(required=True)


class TextCompletion(_CompletionEnvelope):
    choices = fields.List(fields.Nested(TextChoice), required=True)


class ModelObject(ResponseSchema):
    id = fields.String(required=True)
    object = fields.String(required=True)
    created = fields.Integer(required=True)
    owned_by = fields.String(required=True)
    kind = fields.String(metadata={"description": "this server's: chat, embedding or rerank"})
    status = fields.String(metadata={"description": "this server's: loaded, loading, unloaded (loads on its next "
                                                    "request) or failed"})
    error = fields.String(metadata={"description": "why the model failed to load (status failed)"})


class ModelList(ResponseSchema):
    object = fields.String(required=True)
    data = fields.List(fields.Nested(ModelObject), required=True)


class AnthropicErrorBody(ResponseSchema):
    type = fields.String(required=True)
    message = fields.String(required=True)


class AnthropicError(ResponseSchema):
    type = fields.String(required=True)
    error = fields.Nested(AnthropicErrorBody, required=True)
    request_id = fields.String(required=True)


class TextBlock(ResponseSchema):
    type = fields.String(required=True)
    text = fields.String(required=True)


class AnthropicCacheCreation(ResponseSchema):
    ephemeral_5m_input_tokens = fields.Integer(required=True)
    ephemeral_1h_input_tokens = fields.Integer(required=True)


class AnthropicUsage(ResponseSchema):
    input_tokens = fields.Integer(required=True)
    output_tokens = fields.Integer(required=True)
    cache_creation_input_tokens = fields.Integer(allow_none=True)
    cache_read_input_tokens = fields.Integer(allow_none=True)
    cache_creation = fields.Nested(AnthropicCacheCreation, allow_none=True)
    server_tool_use = fields.Dict(allow_none=True)
    service_tier = fields.String(allow_none=True)


class AnthropicMessage(ResponseSchema):
    id = fields.String(required=True)
    type = fields.String(required=True)
    role = fields.String(required=True)
    model = fields.String(required=True)
    content = fields.List(fields.Nested(TextBlock), required=True)
    stop_reason = fields.String(required=True, allow_none=True)
    stop_sequence = fields.String(required=True, allow_none=True)
    usage = fields.Nested(AnthropicUsage, required=True)


class TokenizeResult(ResponseSchema):
    count = fields.Integer(required=True)
    max_model_len = fields.Integer(required=True)
    tokens = fields.List(fields.Integer(), required=True)
    token_strs = fields.List(fields.String())


class DetokenizeResult(ResponseSchema):
    prompt = fields.String(required=True)


class TokenCount(ResponseSchema):
    input_tokens = fields.Integer(required=True)


class Status(ResponseSchema):
    status = fields.String(required=True)
    model = fields.String()
    queued = fields.Integer()
    running = fields.Integer()
    error = fields.String(metadata={"description": "why the last model load failed (status 'load failed')"})
    models = fields.Dict(keys=fields.String(), values=fields.Dict(), metadata={
        "description": "each other model's state (chat models beside the default one, embedding and rerank models): "
                       "kind, status (loaded, loading, unloaded, failed) and error"})


class Response(ResponseSchema):
    """``/v1/responses`` result."""

    id = fields.String(required=True)
    object = fields.String(required=True)
    created_at = fields.Integer(required=True)
    model = fields.String(required=True)
    status = fields.String(required=True)
    output = fields.List(fields.Dict(), required=True)
    usage = fields.Dict(required=True, allow_none=True)
