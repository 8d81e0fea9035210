"""Paths under the API's ``/v1/`` that no route serves, and methods a route does not take: answered in the protocol's
envelope (404, or 405 with ``Allow``), never with Flask's HTML page. The catch-all rule lives on the blueprint and
covers ``/v1/…`` only, so the host app's own 404 and 405 pages elsewhere are untouched; werkzeug tries it last (a
``path`` converter is the least specific rule), after every real route."""

from __future__ import annotations

from flask import Blueprint, request
from werkzeug.exceptions import MethodNotAllowed, NotFound

from ..errors import UnknownRoute
from .errors import RENDERERS

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def _allowed_methods(path: str) -> list[str]:
    """The methods that a real route (not this catch-all) takes on ``path``."""
    from flask import current_app

    adapter = current_app.url_map.bind("localhost")
    allowed = []
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        try:
            endpoint, _ = adapter.match(path, method=method)
        except (NotFound, MethodNotAllowed):
            continue
        except Exception:  # a redirect or a converter's refusal: not a method this path takes
            continue
        if not endpoint.endswith(".unknown_route"):
            allowed.append(method)
    return allowed


def unknown_route(rest: str):
    protocol = "anthropic" if rest == "messages" or rest.startswith("messages/") else "openai"
    return RENDERERS[protocol](UnknownRoute(request.method, request.path, _allowed_methods(request.path)))


def register(bp: Blueprint) -> None:
    """Last, after every real route of the blueprint."""
    bp.add_url_rule("/v1/<path:rest>", "unknown_route", unknown_route, methods=METHODS)
