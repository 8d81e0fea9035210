"""Request helpers shared by every protocol's routes."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from flask import current_app, g, request
from werkzeug.exceptions import RequestEntityTooLarge

from .. import metrics
from ..chat.conversation import ChatRequest
from ..chat.pipeline import ChatStream
from ..chat.prompt import ChatPrompt, render
from ..errors import InvalidRequest, ModelNotFound, RequestTooLarge
from ..events import GenerationRequest
from ..runtime import Runtime

log = logging.getLogger("llm_blueprint")


def runtime() -> Runtime:
    return current_app.extensions["llm"]


def json_body() -> Any:
    """The parsed JSON body, or a clear client error (never Flask's HTML 400/415)."""
    try:
        raw = request.get_data(cache=True)
    except RequestEntityTooLarge:
        raise RequestTooLarge(runtime().settings["LLM_MAX_BODY_BYTES"]) from None
    if not raw:
        raise InvalidRequest("the request body is empty; send a JSON object")
    if runtime().settings["LLM_LOG_PROMPTS"]:  # off by default: prompts are private
        log.info("request body", extra={"body": raw[:20000].decode("utf-8", errors="replace")})
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


def closing(events, body, failure):
    """Yield ``body``; close the engine stream(s) whatever ends the HTTP stream (client gone included).

    A failure inside ``body`` still ends the stream with the protocol's final
    events, from ``failure(exception, request_id)``. Also records the stream's
    total duration and its log line, which only its end can know.
    """
    # Read the request context now: the stream body runs after the view returned.
    route = request.url_rule.rule if request.url_rule else request.path
    return _closing(events, body, failure, route, g.get("llm_started"), g.get("llm_request_id"))


def ended_anyway(body, failure, request_id: str | None = None):
    """``body``; if it fails, what it wrote so far and then the protocol's final events from ``failure``."""
    try:
        yield from body
    except Exception as exc:  # a failed generation, a bug, a native error: the client still gets the final events
        yield from failure(exc, request_id)


def _closing(events, body, failure, route, started, request_id):
    completed = False
    try:
        yield from ended_anyway(body, failure, request_id)
        completed = True
    finally:
        for stream in events if isinstance(events, list) else [events]:
            stream.close()
        if started is not None:
            elapsed = time.monotonic() - started
            metrics.DURATION.labels(route).observe(elapsed)
            log.info("stream %s %s after %.3fs", route, "completed" if completed else "closed by the client",
                     elapsed, extra={"request_id": request_id, "route": route, "latency_s": round(elapsed, 4),
                                     "stream": True, "completed": completed})


def check_limits(messages: int | None = None, max_tokens: int | None = None, stop: list[str] | None = None,
                 stop_param: str = "stop") -> None:
    """The configured per-request limits, shared by every protocol."""
    settings = runtime().settings
    if messages is not None and messages > settings["LLM_MAX_MESSAGES"]:
        raise InvalidRequest(f"at most {settings['LLM_MAX_MESSAGES']} messages are allowed per request", param="messages")
    ceiling = settings["LLM_MAX_TOKENS_LIMIT"]
    if max_tokens is not None and ceiling and max_tokens > ceiling:
        raise InvalidRequest(f"max_tokens must be at most {ceiling} on this server", param="max_tokens")
    if stop:
        if len(stop) > settings["LLM_MAX_STOP_SEQUENCES"]:
            raise InvalidRequest(f"at most {settings['LLM_MAX_STOP_SEQUENCES']} stop sequences are allowed", param=stop_param)
        if max(len(s) for s in stop) > settings["LLM_MAX_STOP_LENGTH"]:
            raise InvalidRequest(f"stop sequences must be at most {settings['LLM_MAX_STOP_LENGTH']} characters", param=stop_param)


def sampling_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """temperature/top_p/top_k of a validated body, nulls meaning the APIs' defaults (1.0, 1.0, off)."""
    temperature = data.get("temperature")
    return {"temperature": 1.0 if temperature is None else temperature, "top_p": data.get("top_p") or 1.0,
            "top_k": data.get("top_k") or 0}


def completion_budget(requested: int | None, prompt_ids: list[int]) -> int:
    """``requested`` max tokens, or (when the client gave none) the configured default that still fits the context."""
    if requested is not None:
        return requested
    rt = runtime()
    return max(1, min(rt.settings["LLM_DEFAULT_MAX_TOKENS"], rt.model.context_length - len(prompt_ids)))


def start_chat(chat: ChatRequest, requested_max_tokens: int | None, **options: Any) -> tuple[ChatPrompt, ChatStream]:
    """Render ``chat``, check it, and start its generation; ``options`` are GenerationRequest fields."""
    rt = runtime()
    prompt = render(rt.model, chat)
    request = GenerationRequest(prompt.ids, completion_budget(requested_max_tokens, prompt.ids), **options)
    structured = chat.response_format is not None or (chat.tool_choice.forced and chat.active_tools)
    if structured and request.n > 1:
        raise InvalidRequest("n > 1 is not supported with a forced tool call or a JSON response_format", param="n")
    rt.engine.validate(request)
    settings = rt.settings
    stream = ChatStream(rt.engine, rt.generate, chat, prompt, request, reasoning=settings["LLM_REASONING"],
                        attempts=settings["LLM_STRUCTURED_ATTEMPTS"])
    return prompt, stream
