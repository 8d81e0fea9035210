"""Every API request's id, metrics and access-log line.

Registered on the blueprint only (never app-wide), so the host app's own
routes are untouched. Streams log their own line when they end (api/sse.py).
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from flask import Blueprint, Response, g, request

from .. import metrics

log = logging.getLogger("llm_blueprint")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Operational routes: no API key (/metrics has its own token), not counted nor logged (scraped every few seconds).
OPEN_ENDPOINTS = {"healthz", "readyz", "metrics", "openapi"}
# Answered before any key is checked: a path no route has (or a method it refuses) reveals nothing.
UNCHECKED_ENDPOINTS = {"unknown_route"}


def request_id() -> str:
    """This request's id: the client's ``X-Request-Id`` when it is well-formed, else one made here, once."""
    if not g.get("llm_request_id"):
        given = request.headers.get("X-Request-Id", "")
        g.llm_request_id = given if REQUEST_ID.match(given) else f"req_{uuid.uuid4().hex}"
    return g.llm_request_id


def _begin() -> None:
    request_id()
    g.llm_started = time.monotonic()


def _end(response: Response) -> Response:
    response.headers["X-Request-Id"] = request_id()
    if g.get("llm_omitted_tools"):  # tools the request gave that the model did not see (api/common.set_aside_tools)
        response.headers["LLM-Omitted-Tools"] = ", ".join(g.llm_omitted_tools)
    endpoint = (request.endpoint or "").split(".")[-1]
    if endpoint in OPEN_ENDPOINTS:
        return response
    route = request.url_rule.rule if request.url_rule else request.path
    metrics.REQUESTS.labels(route, str(response.status_code)).inc()
    if not response.is_streamed:
        elapsed = time.monotonic() - g.get("llm_started", time.monotonic())
        metrics.DURATION.labels(route).observe(elapsed)
        log.info("%s %s %d %.3fs", request.method, route, response.status_code, elapsed,
                 extra={"route": route, "status": response.status_code, "latency_s": round(elapsed, 4)})
    return response


def register(bp: Blueprint) -> None:
    """Before anything else of the blueprint: the id and start time are set for every later hook and view."""
    bp.before_request(_begin)
    bp.after_request(_end)
