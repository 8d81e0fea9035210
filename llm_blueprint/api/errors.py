"""Errors rendered once per protocol, into that protocol's envelope and status."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from flask import Response, g, has_request_context

from .. import metrics
from ..errors import (
    EngineShutDown,
    InvalidModelOutput,
    InvalidRequest,
    LLMBlueprintError,
    ModelLoadError,
    ModelNotFound,
    Overloaded,
    RateLimited,
    RequestTooLarge,
    Unauthorized,
)
from ..sse import json_response

log = logging.getLogger("llm_blueprint")


# Exception type → (status, error type) per protocol; the first matching row wins.
STATUS_TABLE: list[tuple[type[Exception] | tuple[type[Exception], ...], dict[str, tuple[int, str]]]] = [
    (Unauthorized, {"openai": (401, "authentication_error"), "anthropic": (401, "authentication_error")}),
    (RequestTooLarge, {"openai": (413, "invalid_request_error"), "anthropic": (413, "request_too_large")}),
    (ModelNotFound, {"openai": (404, "invalid_request_error"), "anthropic": (404, "not_found_error")}),
    (InvalidRequest, {"openai": (400, "invalid_request_error"), "anthropic": (400, "invalid_request_error")}),
    (InvalidModelOutput, {"openai": (422, "invalid_model_output"), "anthropic": (422, "api_error")}),
    (Overloaded, {"openai": (429, "rate_limit_error"), "anthropic": (529, "overloaded_error")}),
    (RateLimited, {"openai": (429, "rate_limit_error"), "anthropic": (429, "rate_limit_error")}),
    ((EngineShutDown, ModelLoadError), {"openai": (503, "service_unavailable"), "anthropic": (529, "overloaded_error")}),
]
INTERNAL = {"openai": (500, "server_error"), "anthropic": (500, "api_error")}


def current_request_id() -> str:
    """This request's id (see api/guard.py), or a fresh one outside a request."""
    if has_request_context() and getattr(g, "llm_request_id", None):
        return g.llm_request_id
    import uuid

    return f"req_{uuid.uuid4().hex}"


def protocol_of(endpoint: str | None) -> str:
    """Which protocol's envelope an endpoint answers in."""
    return "anthropic" if endpoint and endpoint.split(".")[-1].startswith("anthropic_") else "openai"


def _classify(exc: Exception, protocol: str) -> tuple[int, str, str, dict[str, str]]:
    """Status, error type, client-facing message and extra headers for ``exc``."""
    status, kind = next((row[protocol] for types, row in STATUS_TABLE if isinstance(exc, types)), INTERNAL[protocol])
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, (Overloaded, RateLimited)) else {}
    message = getattr(exc, "message", None) or str(exc)
    if status == 500:
        log.error("internal error", exc_info=exc)
        message = "The server had an error while processing your request."
    else:
        metrics.REJECTIONS.labels(getattr(exc, "code", None) or type(exc).__name__).inc()
    return status, kind, message, headers


def openai_error(exc: Exception) -> Response:
    """``{"error": {"message", "type", "param", "code"}}`` with the OpenAI status."""
    status, kind, message, headers = _classify(exc, "openai")
    body = {"error": {"message": message, "type": kind, "param": getattr(exc, "param", None), "code": getattr(exc, "code", None)}}
    return json_response(body, status=status, headers=headers)


def anthropic_error(exc: Exception) -> Response:
    """``{"type": "error", "error": {"type", "message"}, "request_id"}`` with the Anthropic status."""
    status, kind, message, headers = _classify(exc, "anthropic")
    param = getattr(exc, "param", None)
    if param and isinstance(exc, InvalidRequest) and not message.startswith("Invalid value"):
        message = f"{param}: {message}"
    request_id = current_request_id()
    headers["request-id"] = request_id
    body = {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}
    return json_response(body, status=status, headers=headers)


RENDERERS: dict[str, Callable[[Exception], Response]] = {"openai": openai_error, "anthropic": anthropic_error}


def speaks(protocol: str):
    """Decorate a view so every failure is rendered in ``protocol``'s envelope."""
    render = RENDERERS[protocol]

    def decorate(view):
        @functools.wraps(view)
        def wrapper(*args, **kwargs):
            try:
                return view(*args, **kwargs)
            except LLMBlueprintError as exc:
                return render(exc)
            except Exception as exc:  # a bug of ours: still the protocol's envelope, never Flask's HTML
                return render(exc)

        return wrapper

    return decorate
