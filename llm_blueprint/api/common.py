"""Request helpers shared by every protocol's routes."""

from __future__ import annotations

import json
from typing import Any

from flask import current_app, request

from ..errors import InvalidRequest, LLMBlueprintError, ModelNotFound
from ..runtime import Runtime


def runtime() -> Runtime:
    return current_app.extensions["llm"]


def json_body() -> Any:
    """The parsed JSON body, or a clear client error (never Flask's HTML 400/415)."""
    raw = request.get_data(cache=True)
    if not raw:
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not valid UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None


def check_model(name: str, strict: bool = False) -> None:
    """404 unless ``name`` is the served model (or any name is accepted)."""
    rt = runtime()
    if name != rt.model_id and (strict or not rt.settings["LLM_ACCEPT_ANY_MODEL"]):
        raise ModelNotFound(name, rt.model_id)


def closing(events, body):
    """Yield ``body``; close the engine stream(s) whatever ends the HTTP stream (client gone included)."""
    try:
        yield from body
    finally:
        for stream in events if isinstance(events, list) else [events]:
            stream.close()


def raise_if_failed(finishes) -> None:
    """A non-streaming response whose generation failed is a server error."""
    for finish in finishes:
        if finish.reason == "error":
            raise LLMBlueprintError(f"generation failed: {finish.error}")
