"""The OpenAPI document of the API, generated from the blueprint's routes and the marshmallow schemas (apispec).

A view states its own operation with :func:`documented`; the document lists
every route of the blueprint that does, at the path it is really registered
under, so routes and document cannot drift apart. Routes without it
(``/metrics``, this document) are left out on purpose.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, current_app, request
from marshmallow import Schema

from ..schemas.response_bodies import AnthropicError, OpenAIError
from ..version import __version__
from .common import json_response, runtime

OPENAI_ERRORS = (400, 401, 404, 413, 429, 503)
ANTHROPIC_ERRORS = (400, 401, 404, 413, 429, 529)  # 429: LLM_RATE_LIMIT
ERROR_BODIES: dict[str, type[Schema]] = {"openai": OpenAIError, "anthropic": AnthropicError}  # by the view's error_envelope
# One Server-Sent Event: OpenAI chat/completions streams send data only; Anthropic and
# Responses streams name each event; data is JSON text (or "[DONE]").
SSE = {"text/event-stream": {"schema": {"type": "object", "required": ["data"], "properties": {
    "event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}}}
PATH_ARGUMENT = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")  # werkzeug's <converter:name>


@dataclass(frozen=True)
class Operation:
    operation_id: str
    ok: type[Schema]
    body: type[Schema] | None
    errors: tuple[int, ...]
    stream: bool
    error: type[Schema] | None


def documented(operation_id: str, ok: type[Schema], *, body: type[Schema] | None = None, errors: tuple[int, ...] = (),
               stream: bool = False, error: type[Schema] | None = None) -> Callable:
    """Describe a view's operation: its request ``body``, its 200 (JSON, or also SSE when it can ``stream``) and the
    statuses of its ``errors``, in ``error``'s shape (default: the envelope of the view's protocol)."""

    def decorate(view: Callable) -> Callable:
        view.openapi = Operation(operation_id, ok, body, errors, stream, error)
        return view

    return decorate


def _openapi_of_custom_fields(self, field, **kwargs) -> dict[str, Any]:
    """Custom fields describe their own JSON shape with an ``openapi`` class attribute."""
    return dict(getattr(field, "openapi", {}))


def _operation(operation: Operation, error: type[Schema] | None, arguments: list[str]) -> dict[str, Any]:
    ok: dict[str, Any] = {"application/json": {"schema": operation.ok}}
    if operation.stream:
        ok.update(SSE)
    responses: dict[str, Any] = {"200": {"description": "OK", "content": ok}}
    for status in operation.errors:
        responses[str(status)] = {"description": "error", "content": {"application/json": {"schema": operation.error or error}}}
    result: dict[str, Any] = {"operationId": operation.operation_id, "responses": responses}
    if operation.body is not None:
        result["requestBody"] = {"required": True, "content": {"application/json": {"schema": operation.body}}}
    if arguments:
        result["parameters"] = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in arguments]
    return result


def build_spec(routes: list[tuple[str, list[str], Callable]], prefix: str = "") -> dict[str, Any]:
    """The document of ``routes``: (rule as registered, methods, view) of every route of the blueprint."""
    plugin = MarshmallowPlugin()
    spec = APISpec(title="llm-blueprint", version=__version__, openapi_version="3.0.3", plugins=[plugin],
                   servers=[{"url": prefix or "/"}])
    plugin.converter.add_attribute_function(_openapi_of_custom_fields)
    for rule, methods, view in routes:
        operation = getattr(view, "openapi", None)
        if operation is None:
            continue
        path = PATH_ARGUMENT.sub(r"{\1}", rule[len(prefix):] if prefix and rule.startswith(prefix) else rule)
        error = ERROR_BODIES.get(getattr(view, "protocol", ""))
        spec.path(path, operations={method.lower(): _operation(operation, error, PATH_ARGUMENT.findall(rule))
                                    for method in methods})
    return spec.to_dict()


def openapi_view():
    rt = runtime()
    if rt.openapi is None:
        blueprint = f"{request.blueprint}."
        routes = [(rule.rule, sorted(rule.methods - {"HEAD", "OPTIONS"}), current_app.view_functions[rule.endpoint])
                  for rule in current_app.url_map.iter_rules() if rule.endpoint.startswith(blueprint)]
        rt.openapi = build_spec(routes, rt.settings["LLM_URL_PREFIX"])
    return json_response(rt.openapi)


def register(bp: Blueprint) -> None:
    bp.add_url_rule("/openapi.json", "openapi", openapi_view, methods=["GET"])
