"""The HTTP side: one blueprint per app, one module of routes per protocol."""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from . import anthropic, guard, openai, operations


def create_blueprint(settings: dict[str, Any]) -> Blueprint:
    """The API blueprint for one app (its CORS policy depends on that app's settings)."""
    bp = Blueprint("llm", __name__)
    guard.register(bp)
    openai.register(bp)
    anthropic.register(bp)
    operations.register(bp)
    origins = settings["LLM_CORS_ORIGINS"]
    if origins:
        from flask_cors import CORS

        CORS(bp, origins=origins, expose_headers=["X-Request-Id", "request-id", "Retry-After"],
             allow_headers=["Authorization", "Content-Type", "x-api-key", "anthropic-version", "X-Request-Id"], max_age=600)
    return bp


__all__ = ["create_blueprint"]
