"""Server-Sent Events: the framing, and the streaming response of a generation, in one place."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Response, g, request

from .. import metrics
from ..events import EventStream
from .common import dumps

log = logging.getLogger("llm_blueprint")

KEEPALIVE = ": keep-alive\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# The protocol's final events after a failure mid-stream: (exception, request id) -> SSE text.
Failure = Callable[[Exception, str | None], Iterable[str]]


def sse(payload: Any, event: str | None = None) -> str:
    """One event: an optional ``event:`` line, then ``data:`` (JSON, or a raw string like ``[DONE]``)."""
    data = payload if isinstance(payload, str) else dumps(payload)
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {data}\n\n"


def event_stream(body: Iterator[str], generations: EventStream | list[EventStream], failure: Failure) -> Response:
    """The streaming response of a request's generation(s): ``body``, the protocol's formatter of their events.

    Whatever ends the stream (its last event, a failure inside ``body``, the
    client gone), the generations are closed and the stream's duration is
    measured and logged; a failure ends it with ``failure``'s final events.
    ``body`` runs after the view returned, outside the request and app
    contexts: the view resolves everything it needs.
    """
    route = request.url_rule.rule if request.url_rule else request.path
    streams = generations if isinstance(generations, list) else [generations]
    chunks = _written(body, streams, failure, route, g.get("llm_started"), g.get("llm_request_id"))
    return Response(chunks, status=200, mimetype="text/event-stream", headers=SSE_HEADERS, direct_passthrough=True)


def ended_anyway(body: Iterator[str], failure: Failure, request_id: str | None = None) -> Iterator[str]:
    """``body``; if it fails, what it wrote so far and then the protocol's final events from ``failure``."""
    try:
        yield from body
    except Exception as exc:  # a failed generation, a bug, a native error: the client still gets the final events
        yield from failure(exc, request_id)


def _written(body: Iterator[str], streams: list[EventStream], failure: Failure, route: str, started: float | None,
             request_id: str | None) -> Iterator[bytes]:
    completed = False
    try:
        for chunk in ended_anyway(body, failure, request_id):
            yield chunk.encode("utf-8")
        completed = True
    finally:
        body.close()
        for stream in streams:
            stream.close()
        if started is not None:
            elapsed = time.monotonic() - started
            metrics.DURATION.labels(route).observe(elapsed)
            log.info("stream %s %s after %.3fs", route, "completed" if completed else "closed by the client",
                     elapsed, extra={"request_id": request_id, "route": route, "latency_s": round(elapsed, 4),
                                     "stream": True, "completed": completed})
