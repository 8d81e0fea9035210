"""The OpenAPI document of the API, generated from the marshmallow schemas (apispec)."""

from __future__ import annotations

from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint

from .. import __version__
from ..schemas import anthropic as anthropic_schemas
from ..schemas import openai as openai_schemas
from ..schemas import openai_responses, response_bodies
from .common import json_response, runtime

# One Server-Sent Event: OpenAI chat/completions streams send data only; Anthropic and
# Responses streams name each event; data is JSON text (or "[DONE]").
SSE = {"text/event-stream": {"schema": {"type": "object", "required": ["data"], "properties": {
    "event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}}}


def _openapi_of_custom_fields(self, field, **kwargs) -> dict[str, Any]:
    """Custom fields describe their own JSON shape with an ``openapi`` class attribute."""
    return dict(getattr(field, "openapi", {}))


def _responses(ok: str | None, error: str, statuses: tuple[int, ...], stream: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if ok:
        content: dict[str, Any] = {"application/json": {"schema": ok}}
        if stream:
            content.update(SSE)
        result["200"] = {"description": "OK", "content": content}
    for status in statuses:
        result[str(status)] = {"description": "error", "content": {"application/json": {"schema": error}}}
    return result


def build_spec(prefix: str = "") -> dict[str, Any]:
    plugin = MarshmallowPlugin()
    spec = APISpec(title="llm-blueprint", version=__version__, openapi_version="3.0.3", plugins=[plugin],
                   servers=[{"url": prefix or "/"}])
    plugin.converter.add_attribute_function(_openapi_of_custom_fields)
    for name, schema in [
        ("ChatCompletionRequest", openai_schemas.ChatCompletionRequestSchema),
        ("CompletionRequest", openai_schemas.CompletionRequestSchema),
        ("MessagesRequest", anthropic_schemas.MessagesRequestSchema),
        ("CountTokensRequest", anthropic_schemas.CountTokensSchema),
        ("OpenAIError", response_bodies.OpenAIError), ("ChatCompletion", response_bodies.ChatCompletion),
        ("TextCompletion", response_bodies.TextCompletion), ("ModelList", response_bodies.ModelList),
        ("AnthropicError", response_bodies.AnthropicError), ("AnthropicMessage", response_bodies.AnthropicMessage),
        ("TokenCount", response_bodies.TokenCount), ("Status", response_bodies.Status),
        ("ResponsesRequest", openai_responses.ResponsesRequestSchema), ("Response", response_bodies.ResponseObject),
    ]:
        spec.components.schema(name, schema=schema)
    openai_errors = (400, 401, 404, 413, 429, 503)
    anthropic_errors = (400, 401, 404, 413, 529)

    def body(name: str) -> dict[str, Any]:
        return {"required": True, "content": {"application/json": {"schema": name}}}

    spec.path("/v1/chat/completions", operations={"post": {
        "operationId": "createChatCompletion", "requestBody": body("ChatCompletionRequest"),
        "responses": _responses("ChatCompletion", "OpenAIError", openai_errors, stream=True)}})
    spec.path("/v1/completions", operations={"post": {
        "operationId": "createCompletion", "requestBody": body("CompletionRequest"),
        "responses": _responses("TextCompletion", "OpenAIError", openai_errors, stream=True)}})
    spec.path("/v1/responses", operations={"post": {
        "operationId": "createResponse", "requestBody": body("ResponsesRequest"),
        "responses": _responses("Response", "OpenAIError", openai_errors, stream=True)}})
    spec.path("/v1/models", operations={"get": {
        "operationId": "listModels", "responses": _responses("ModelList", "OpenAIError", (401,))}})
    spec.path("/v1/models/{model_id}", operations={"get": {
        "operationId": "retrieveModel",
        "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": _responses("ModelObject", "OpenAIError", (401, 404))}})
    spec.path("/v1/messages", operations={"post": {
        "operationId": "createMessage", "requestBody": body("MessagesRequest"),
        "responses": _responses("AnthropicMessage", "AnthropicError", anthropic_errors, stream=True)}})
    spec.path("/v1/messages/count_tokens", operations={"post": {
        "operationId": "countTokens", "requestBody": body("CountTokensRequest"),
        "responses": _responses("TokenCount", "AnthropicError", anthropic_errors)}})
    spec.path("/healthz", operations={"get": {"operationId": "healthz", "responses": _responses("Status", "Status", ())}})
    spec.path("/readyz", operations={"get": {"operationId": "readyz", "responses": _responses("Status", "Status", (503,))}})
    return spec.to_dict()


def openapi_view():
    rt = runtime()
    if rt.openapi is None:
        rt.openapi = build_spec(rt.settings["LLM_URL_PREFIX"])
    return json_response(rt.openapi)


def register(bp: Blueprint) -> None:
    bp.add_url_rule("/openapi.json", "openapi", openapi_view, methods=["GET"])
