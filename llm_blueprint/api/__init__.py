"""The HTTP side: one blueprint per app, one module of routes per protocol."""

from __future__ import annotations

from typing import Any

from flask import Blueprint
from werkzeug.routing import PathConverter

from . import (
    admin,
    admission,
    anthropic,
    common,
    embeddings,
    openai,
    openai_responses,
    openapi,
    operations,
    request_log,
    tokenize,
    unknown_routes,
)


class ModelIdConverter(PathConverter):
    """Any model id, control characters and slashes included, so that every id reaches
    the route (and gets our 404 envelope) instead of falling through to the host's 404 page."""

    regex = r"[\s\S]+"


def create_blueprint(settings: dict[str, Any]) -> Blueprint:
    """The API blueprint for one app (its CORS policy depends on that app's settings)."""
    bp = Blueprint("llm", __name__)
    bp.record_once(lambda state: state.app.url_map.converters.setdefault("llm_model_id", ModelIdConverter))
    request_log.register(bp)  # first: every later hook and view has the request id
    bp.teardown_request(common.unpin)
    admission.register(bp)
    openai.register(bp)
    anthropic.register(bp)
    openai_responses.register(bp)
    tokenize.register(bp)
    embeddings.register(bp)
    operations.register(bp)
    admin.register(bp)
    openapi.register(bp)
    unknown_routes.register(bp)  # last: answers /v1/ paths and methods no route above takes
    origins = settings["LLM_CORS_ORIGINS"]
    if origins:
        from flask_cors import CORS

        CORS(bp, origins=origins, expose_headers=["X-Request-Id", "request-id", "Retry-After"],
             allow_headers=["Authorization", "Content-Type", "x-api-key", "anthropic-version", "X-Request-Id"], max_age=600)
    return bp


__all__ = ["create_blueprint"]
