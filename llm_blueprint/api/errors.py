"""Errors rendered once per protocol, into that protocol's envelope and status."""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable

from flask import Response

from ..errors import EngineShutDown, InvalidRequest, LLMBlueprintError, ModelLoadError, ModelNotFound, Overloaded
from ..sse import json_response

log = logging.getLogger("llm_blueprint")


def openai_error(exc: Exception) -> Response:
    """``{"error": {"message", "type", "param", "code"}}`` with the OpenAI status."""
    headers = None
    if isinstance(exc, ModelNotFound):
        status, kind = 404, "invalid_request_error"
    elif isinstance(exc, InvalidRequest):
        status, kind = 400, "invalid_request_error"
    elif isinstance(exc, Overloaded):
        status, kind, headers = 429, "rate_limit_error", {"Retry-After": str(exc.retry_after)}
    elif isinstance(exc, (EngineShutDown, ModelLoadError)):
        status, kind = 503, "service_unavailable"
    else:
        status, kind = 500, "server_error"
    message = exc.message if isinstance(exc, (InvalidRequest, Overloaded)) else str(exc)
    if status == 500:
        log.exception("internal error", exc_info=exc)
        message = "The server had an error while processing your request."
    body = {"error": {"message": message, "type": kind, "param": getattr(exc, "param", None), "code": getattr(exc, "code", None)}}
    return json_response(body, status=status, headers=headers)


def anthropic_error(exc: Exception) -> Response:
    """``{"type": "error", "error": {"type", "message"}, "request_id"}`` with the Anthropic status."""
    headers = {}
    if isinstance(exc, ModelNotFound):
        status, kind = 404, "not_found_error"
    elif isinstance(exc, InvalidRequest):
        status, kind = 400, "invalid_request_error"
    elif isinstance(exc, Overloaded):
        status, kind, headers = 529, "overloaded_error", {"Retry-After": str(exc.retry_after)}
    elif isinstance(exc, (EngineShutDown, ModelLoadError)):
        status, kind = 529, "overloaded_error"
    else:
        status, kind = 500, "api_error"
    if isinstance(exc, InvalidRequest):
        message = f"{exc.param}: {exc.message}" if exc.param and not exc.message.startswith("Invalid value") else exc.message
    elif isinstance(exc, Overloaded):
        message = exc.message
    else:
        message = str(exc)
    if status == 500:
        log.exception("internal error", exc_info=exc)
        message = "Internal server error"
    request_id = f"req_{uuid.uuid4().hex}"
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
