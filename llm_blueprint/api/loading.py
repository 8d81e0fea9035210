"""A streaming request for a chat model that is not loaded yet: keep-alive comments while it loads.

Loading a model takes seconds (minutes when a .gguf is converted the first time). A client that streams would see
no byte meanwhile and may give up, so such a request gets its ``200 text/event-stream`` at once, an SSE comment
every ``LLM_KEEPALIVE_SECONDS`` while the model loads, and then the route's own stream. Whatever the route answers
instead (its model failed to load, the prompt is too long...) comes as the protocol's error event, since the status
line is already sent.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterator

from flask import Response, request, stream_with_context
from werkzeug.exceptions import RequestEntityTooLarge

from ..errors import LLMBlueprintError
from .common import resolve_model, runtime
from .errors import protocol_of
from .sse import KEEPALIVE, SSE_HEADERS, sse

LOADING = ": loading the model\n\n"


def _unloaded_model():
    """The chat model a streaming request names when it is neither loaded nor failed; else None (the route then
    answers as usual, and any problem with the body is its to report). The body is only read when some chat model
    is not loaded."""
    rt = runtime()
    if all(m.engine_if_loaded is not None or m.load_error is not None for m in rt.chat.models.values()):
        return None
    try:
        data = json.loads(request.get_data(cache=True))
    except (ValueError, RecursionError, RequestEntityTooLarge):  # the route's json_body() says what is wrong
        return None
    if not isinstance(data, dict) or data.get("stream") is not True:
        return None
    try:
        model = rt.chat_model(resolve_model(data.get("model")))
    except (LLMBlueprintError, KeyError, TypeError):
        return None
    return model if model.engine_if_loaded is None and model.load_error is None else None


def _error_events(response: Response, endpoint: str | None) -> Iterator[str]:
    """A route's JSON error answer as its protocol's stream error."""
    try:
        body = json.loads(response.get_data())
    except ValueError:
        body = {"error": {"message": f"HTTP {response.status_code}", "type": "server_error"}}
    if protocol_of(endpoint) == "anthropic":
        yield sse(body, "error")
    elif (endpoint or "").endswith("responses"):
        error = body.get("error") or {}
        yield sse({"type": "error", "code": error.get("code") or error.get("type"), "message": error.get("message"),
                   "param": error.get("param"), "sequence_number": 0}, "error")
    else:
        yield sse(body)
        yield sse("[DONE]")


def while_loading(view):
    """Decorate a streaming route (outside its error envelope): see the module's docstring."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        model = _unloaded_model()
        if model is None:
            return view(*args, **kwargs)
        interval = runtime().settings["LLM_KEEPALIVE_SECONDS"]
        endpoint = request.endpoint
        loaded = threading.Event()  # gevent's under monkey patching: the waits below yield to the hub

        def load() -> None:
            try:
                model.load()  # off the event loop; a failure is the route's to report
            except Exception:
                pass
            finally:
                loaded.set()

        threading.Thread(target=load, name="llm-load-for-stream", daemon=True).start()

        @stream_with_context
        def body() -> Iterator[bytes]:
            yield LOADING.encode()
            while not loaded.wait(interval):
                yield KEEPALIVE.encode()
            response = view(*args, **kwargs)
            if response.status_code == 200 and response.mimetype == "text/event-stream":
                try:
                    yield from response.response
                finally:
                    response.close()
            else:
                for chunk in _error_events(response, endpoint):
                    yield chunk.encode()

        return Response(body(), status=200, mimetype="text/event-stream", headers=SSE_HEADERS, direct_passthrough=True)

    return wrapper
