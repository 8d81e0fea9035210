"""``/v1/embeddings`` (OpenAI's shape) and ``/v1/rerank`` (the shape llama.cpp and vLLM serve): request and response
bodies."""

from __future__ import annotations

from marshmallow import ValidationError, fields, validate

from .common import RequestSchema, StrictBool, StrictInt, StrictStr
from .response_bodies import ResponseSchema

_TOKENS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}


def _is_token(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class EmbeddingInputField(fields.Field):
    """``input``: a string, a list of strings, a list of token ids, or a list of such lists; loaded as
    ``("text", [strings])`` or ``("tokens", [[ids]])``."""

    openapi = {"oneOf": [{"type": "string", "minLength": 1},
                         {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                         _TOKENS, {"type": "array", "minItems": 1, "items": _TOKENS}]}

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and value:
            if all(isinstance(v, str) for v in value):
                if not all(value):
                    raise ValidationError("inputs must not be empty strings")
                return "text", value
            if all(_is_token(v) for v in value):
                return "tokens", [value]
            if all(isinstance(v, list) and v and all(_is_token(t) for t in v) for v in value):
                return "tokens", value
        raise ValidationError("must be a non-empty string, a list of strings, a list of token ids or a list of such lists")


class EmbeddingRequestSchema(RequestSchema):
    model = StrictStr(allow_none=True)  # OpenAI requires it; here its absence means the first embedding model
    input = EmbeddingInputField(required=True)
    encoding_format = StrictStr(load_default="float", allow_none=True, validate=validate.OneOf(["float", "base64"]))
    dimensions = StrictInt(allow_none=True, validate=validate.Range(1))
    user = StrictStr(allow_none=True)
    truncate_prompt_tokens = StrictInt(allow_none=True, validate=validate.Range(-1))  # vLLM's: cut inputs to N (-1: the model's limit)


class DocumentField(fields.Field):
    """A document to rank: a string, or ``{"text": ...}`` (Cohere/Jina style)."""

    openapi = {"oneOf": [{"type": "string"}, {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}]}

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, dict) and isinstance(value.get("text"), str):
            return value["text"]
        if isinstance(value, str):
            return value
        raise ValidationError("must be a string or an object with a 'text' string")


class RerankRequestSchema(RequestSchema):
    model = StrictStr(allow_none=True)
    query = StrictStr(required=True)
    documents = fields.List(DocumentField(), required=True, validate=validate.Length(min=1))
    top_n = StrictInt(allow_none=True, validate=validate.Range(1))
    return_documents = StrictBool(load_default=True, allow_none=True)
    truncate_prompt_tokens = StrictInt(allow_none=True, validate=validate.Range(-1))


# Responses ------------------------------------------------------------------------------
class EmbeddingUsage(ResponseSchema):
    prompt_tokens = fields.Integer(required=True)
    total_tokens = fields.Integer(required=True)


class EmbeddingVector(fields.Field):
    openapi = {"oneOf": [{"type": "array", "items": {"type": "number"}},
                         {"type": "string", "description": "base64 of little-endian float32 values"}]}


class Embedding(ResponseSchema):
    object = fields.String(required=True)
    index = fields.Integer(required=True)
    embedding = EmbeddingVector(required=True)


class EmbeddingList(ResponseSchema):
    object = fields.String(required=True)
    data = fields.List(fields.Nested(Embedding), required=True)
    model = fields.String(required=True)
    usage = fields.Nested(EmbeddingUsage, required=True)


class RerankDocument(ResponseSchema):
    text = fields.String(required=True)


class RerankResultItem(ResponseSchema):
    index = fields.Integer(required=True)
    relevance_score = fields.Float(required=True)
    document = fields.Nested(RerankDocument)


class RerankResult(ResponseSchema):
    id = fields.String(required=True)
    object = fields.String(required=True)
    model = fields.String(required=True)
    usage = fields.Nested(EmbeddingUsage, required=True)
    results = fields.List(fields.Nested(RerankResultItem), required=True)
