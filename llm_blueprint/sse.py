"""Server-Sent Events framing, in one place."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from flask import Response

KEEPALIVE = ": keep-alive\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def dumps(payload: Any) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def sse(payload: Any, event: str | None = None) -> str:
    """One event: an optional ``event:`` line, then ``data:`` (JSON, or a raw string like ``[DONE]``)."""
    data = payload if isinstance(payload, str) else dumps(payload)
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {data}\n\n"


def event_stream(chunks: Iterable[str]) -> Response:
    """A streaming ``text/event-stream`` response; closing it closes ``chunks``."""
    return Response(_encoded(chunks), status=200, mimetype="text/event-stream", headers=SSE_HEADERS, direct_passthrough=True)


def _encoded(chunks: Iterable[str]):
    try:
        for chunk in chunks:
            yield chunk.encode("utf-8")
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """JSON serialized by us, so the host app's JSON provider settings neither affect nor are affected."""
    return Response(dumps(payload), status=status, mimetype="application/json", headers=headers)
