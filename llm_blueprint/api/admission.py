"""Whether an API request is let in: not while draining, not too large, with an accepted key (or the host
app's approval), within the rate limit.

Registered on the blueprint only (never app-wide), so the host app's own
routes are untouched.
"""

from __future__ import annotations

import hmac

from flask import Blueprint, Response, current_app, request

from ..errors import EngineShutDown, RateLimited, RateLimitUnavailable, RequestTooLarge, Unauthorized
from .errors import RENDERERS, protocol_of
from .request_log import OPEN_ENDPOINTS, UNCHECKED_ENDPOINTS


def _api_key() -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.headers.get("x-api-key")


def key_matches(given: str | None, accepted: list[str]) -> bool:
    """Constant-time comparison against every accepted key (no early exit on a match)."""
    if not given:
        return False
    matched = False
    for key in accepted:
        matched |= hmac.compare_digest(given.encode(), key.encode())
    return matched


def rate_limit() -> None:
    """Per API key (or client address when the API is open), counted where LLM_RATE_LIMIT_STORAGE says."""
    limiter = current_app.extensions["llm"].rate_limit
    if limiter is not None:
        limiter.check(_api_key() or request.remote_addr or "-")


def authorize() -> None:
    settings = current_app.extensions["llm"].settings
    hook = settings["LLM_AUTH_HOOK"]
    keys = settings["LLM_API_KEYS"]
    if hook is not None and hook(request):
        return
    if keys:
        if key_matches(_api_key(), keys):
            return
        raise Unauthorized()
    if hook is not None:
        raise Unauthorized("Not authorized by the host application.")


def _admit() -> Response | None:
    endpoint = (request.endpoint or "").split(".")[-1]
    if request.method == "OPTIONS" or endpoint in OPEN_ENDPOINTS or endpoint in UNCHECKED_ENDPOINTS:
        return None
    if endpoint.startswith("admin_"):  # admin keys, checked by the view (api/admin.py), never the API keys
        return None
    try:
        if current_app.extensions["llm"].draining:
            raise EngineShutDown("the server is shutting down; retry on another replica")
        limit = current_app.extensions["llm"].settings["LLM_MAX_BODY_BYTES"]
        request.max_content_length = limit
        if request.content_length is not None and request.content_length > limit:
            raise RequestTooLarge(limit)
        authorize()
        rate_limit()
    except (Unauthorized, RequestTooLarge, EngineShutDown, RateLimited, RateLimitUnavailable) as exc:
        return RENDERERS[protocol_of(request.endpoint)](exc)
    return None


def register(bp: Blueprint) -> None:
    bp.before_request(_admit)
