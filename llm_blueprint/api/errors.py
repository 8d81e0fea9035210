"""Errors rendered once per protocol, into that protocol's envelope and status."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response

from .. import metrics
from ..errors import (
    AdminRoutesOff,
    ContextTooLong,
    EngineDead,
    EngineShutDown,
    GenerationFailed,
    InvalidModelOutput,
    InvalidRequest,
    ModelBusy,
    ModelInUse,
    ModelLoadError,
    ModelNotFound,
    Overloaded,
    RateLimited,
    RateLimitUnavailable,
    RequestTooLarge,
    Unauthorized,
    UnknownRoute,
)
from . import request_log
from .common import json_response
from .sse import sse

log = logging.getLogger("llm_blueprint")


# Exception type → (status, error type) per protocol; the first matching row wins. An error with a
# row is one we raise on purpose, and its message is for the client; anything else is a bug of ours.
STATUS_TABLE: list[tuple[type[Exception] | tuple[type[Exception], ...], dict[str, tuple[int, str]]]] = [
    (Unauthorized, {"openai": (401, "authentication_error"), "anthropic": (401, "authentication_error")}),
    (RequestTooLarge, {"openai": (413, "invalid_request_error"), "anthropic": (413, "request_too_large")}),
    (ModelNotFound, {"openai": (404, "invalid_request_error"), "anthropic": (404, "not_found_error")}),
    (ModelInUse, {"openai": (409, "invalid_request_error"), "anthropic": (409, "invalid_request_error")}),
    (AdminRoutesOff, {"openai": (403, "permission_error"), "anthropic": (403, "permission_error")}),
    (InvalidRequest, {"openai": (400, "invalid_request_error"), "anthropic": (400, "invalid_request_error")}),
    (InvalidModelOutput, {"openai": (422, "invalid_model_output"), "anthropic": (422, "api_error")}),
    (Overloaded, {"openai": (429, "rate_limit_error"), "anthropic": (529, "overloaded_error")}),
    (RateLimited, {"openai": (429, "rate_limit_error"), "anthropic": (429, "rate_limit_error")}),
    ((EngineDead, ModelLoadError), {"openai": (503, "service_unavailable"), "anthropic": (503, "api_error")}),
    ((EngineShutDown, ModelBusy, RateLimitUnavailable), {"openai": (503, "service_unavailable"), "anthropic": (529, "overloaded_error")}),
    (GenerationFailed, {"openai": (500, "server_error"), "anthropic": (500, "api_error")}),
]
INTERNAL = {"openai": (500, "server_error"), "anthropic": (500, "api_error")}


def protocol_of(endpoint: str | None) -> str:
    """Which protocol's envelope an endpoint answers in."""
    return "anthropic" if endpoint and endpoint.split(".")[-1].startswith("anthropic_") else "openai"


def _classify(exc: Exception, protocol: str, request_id: str | None = None) -> tuple[int, str, str, dict[str, str]]:
    """Status, error type, client-facing message and extra headers for ``exc``; logged or counted."""
    known = next((row[protocol] for types, row in STATUS_TABLE if isinstance(exc, types)), None)
    status, kind = known or INTERNAL[protocol]
    retry_after = getattr(exc, "retry_after", None) if known else None
    headers = {"Retry-After": str(retry_after)} if retry_after else {}
    if isinstance(exc, UnknownRoute):  # 404 for a path no route has, 405 (with Allow) for a method the route refuses
        status = exc.status
        kind = "not_found_error" if protocol == "anthropic" and status == 404 else kind
        if exc.allowed:
            headers["Allow"] = ", ".join(exc.allowed)
    message = getattr(exc, "message", None) or str(exc)
    if status == 500:  # ours: a bug, or the engine failing
        log.error("internal error" if known is None else message, exc_info=exc if known is None else None,
                  extra={"request_id": request_id})
    else:
        metrics.REJECTIONS.labels(getattr(exc, "code", None) or type(exc).__name__).inc()
    if known is None:  # a bug of ours: the details stay in the log
        message = "The server had an error while processing your request."
    return status, kind, message, headers


def openai_body(exc: Exception, request_id: str | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, ``{"error": {"message", "type", "param", "code"}}`` and headers for ``exc``."""
    status, kind, message, headers = _classify(exc, "openai", request_id)
    body = {"error": {"message": message, "type": kind, "param": getattr(exc, "param", None), "code": getattr(exc, "code", None)}}
    return status, body, headers


def anthropic_body(exc: Exception, request_id: str | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, ``{"type": "error", "error": {"type", "message"}}`` and headers for ``exc``."""
    status, kind, message, headers = _classify(exc, "anthropic", request_id)
    param = getattr(exc, "param", None)
    if isinstance(exc, ContextTooLong):
        message = _anthropic_context_message(exc)
    elif param and isinstance(exc, InvalidRequest) and not message.startswith("Invalid value"):
        message = f"{param}: {message}"
    return status, {"type": "error", "error": {"type": kind, "message": message}}, headers


def _anthropic_context_message(exc: ContextTooLong) -> str:
    """Anthropic's own wording: clients parse it (Claude Code reads the three numbers of the first form, lowers
    ``max_tokens`` to what is left and retries; the second form tells it the prompt itself must shrink)."""
    if exc.prompt_tokens >= exc.context_length:
        return f"prompt is too long: {exc.prompt_tokens} tokens > {exc.context_length} maximum"
    return (f"input length and `max_tokens` exceed context limit: {exc.prompt_tokens} + {exc.max_tokens} > "
            f"{exc.context_length}, decrease input length or `max_tokens` and try again")


def openai_error(exc: Exception) -> Response:
    """``{"error": {"message", "type", "param", "code"}}`` with the OpenAI status."""
    status, body, headers = openai_body(exc)
    return json_response(body, status=status, headers=headers)


def anthropic_error(exc: Exception) -> Response:
    """``{"type": "error", "error": {"type", "message"}, "request_id"}`` with the Anthropic status."""
    status, body, headers = anthropic_body(exc)
    request_id = request_log.request_id()
    headers["request-id"] = request_id
    return json_response({**body, "request_id": request_id}, status=status, headers=headers)


def openai_stream_failure(exc: Exception, request_id: str | None) -> Iterator[str]:
    """The end of an OpenAI stream that failed after its first byte: an error chunk, then ``[DONE]``."""
    yield sse(openai_body(exc, request_id)[1])
    yield sse("[DONE]")


def anthropic_stream_failure(exc: Exception, request_id: str | None) -> Iterator[str]:
    """The end of an Anthropic stream that failed after its first byte: an ``error`` event."""
    yield sse(anthropic_body(exc, request_id)[1], "error")


RENDERERS: dict[str, Callable[[Exception], Response]] = {"openai": openai_error, "anthropic": anthropic_error}


def error_envelope(protocol: str):
    """Decorate a view so every failure is rendered in ``protocol``'s envelope."""
    render = RENDERERS[protocol]

    def decorate(view):
        @functools.wraps(view)
        def wrapper(*args, **kwargs):
            try:
                return view(*args, **kwargs)
            except Exception as exc:  # ours on purpose, or a bug: the protocol's envelope either way, never Flask's HTML
                return render(exc)

        wrapper.protocol = protocol  # the OpenAPI document documents its errors in this envelope
        return wrapper

    return decorate
