"""Helpers shared by every route: the runtime, JSON in and out, the model and limit checks, starting a chat."""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Response, current_app, g, request
from werkzeug.exceptions import RequestEntityTooLarge

from ..chat.conversation import ChatRequest
from ..chat.pipeline import ChatStream
from ..chat.prompt import ChatPrompt, render
from ..chat_model import ChatModel
from ..errors import InvalidRequest, RequestTooLarge
from ..events import EventStream, GenerationRequest
from ..runtime import Runtime

log = logging.getLogger("llm_blueprint")


def dumps(payload: Any) -> str:
    """Compact JSON text, as every body and event of the API is written."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """JSON serialized by us, so the host app's JSON provider settings neither affect nor are affected."""
    return Response(dumps(payload), status=status, mimetype="application/json", headers=headers)


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
    settings = runtime().settings
    if settings["LLM_LOG_PROMPTS"]:  # off by default: prompts are private
        # Whole (an agent's body is about 76 KB): in the message for plain logs, a field of its own for JSON lines.
        body = raw.decode("utf-8", errors="replace")
        if settings["LLM_LOG_JSON"]:
            log.info("request body (%d bytes)", len(raw), extra={"body": body})
        else:
            log.info("request body (%d bytes): %s", len(raw), body, extra={"body": body})
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not valid UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None


def resolve_model(name: str | None, kind: str | None = "chat", strict: bool = False) -> str:
    """The served model id ``name`` names for a route serving ``kind`` models (None: any kind); raises as
    :func:`check_model` says."""
    rt = runtime()
    return rt.registry.resolve(name, kind, accept_any=not strict and rt.settings["LLM_ACCEPT_ANY_MODEL"])


def check_model(name: str | None, strict: bool = False, kind: str | None = "chat") -> str:
    """The served model id ``name`` names for a route serving ``kind`` models (None: any kind): 404 when unknown
    (unless any name is accepted, and not when ``strict``), 400 when the model is of another kind. A chat model
    becomes this request's (:func:`served`), kept loaded until the request has started its generation."""
    rt = runtime()
    model_id = resolve_model(name, kind, strict)
    if kind == "chat" and "llm_chat_model" not in g:
        model = rt.chat_model(model_id)
        model.pins += 1  # until the request ends (unpin): never unloaded between here and its generation's start
        g.llm_chat_model = model
    return model_id


def unpin(_exc: BaseException | None = None) -> None:
    """The request is over: its chat model may be unloaded again (its generation, if any, counts on its own)."""
    model = g.pop("llm_chat_model", None)
    if model is not None:
        model.pins -= 1


def served() -> ChatModel:
    """The chat model of this request (the one :func:`check_model` chose; the default one before that)."""
    return g.get("llm_chat_model") or runtime().chat_model()


def check_limits(messages: int | None = None, max_tokens: int | None = None, stop: list[str] | None = None,
                 stop_param: str = "stop", n: int = 1, tools: int = 0) -> None:
    """The configured per-request limits (LLM_MAX_*), every one checked here, for every protocol.

    What a request may be in any server is its schema's business (schemas/);
    whether it fits the model's context is the engine's (Engine.validate).
    """
    settings = runtime().settings
    if messages is not None and messages > settings["LLM_MAX_MESSAGES"]:
        raise InvalidRequest(f"at most {settings['LLM_MAX_MESSAGES']} messages are allowed per request", param="messages")
    if n > settings["LLM_MAX_N"]:
        raise InvalidRequest(f"n must be at most {settings['LLM_MAX_N']}", param="n")
    if tools > settings["LLM_MAX_TOOLS"]:
        raise InvalidRequest(f"at most {settings['LLM_MAX_TOOLS']} tools are allowed per request", param="tools")
    ceiling = settings["LLM_MAX_TOKENS_LIMIT"]
    if max_tokens is not None and ceiling and max_tokens > ceiling:
        raise InvalidRequest(f"max_tokens must be at most {ceiling} on this server", param="max_tokens")
    if stop:
        if len(stop) > settings["LLM_MAX_STOP_SEQUENCES"]:
            raise InvalidRequest(f"at most {settings['LLM_MAX_STOP_SEQUENCES']} stop sequences are allowed", param=stop_param)
        if max(len(s) for s in stop) > settings["LLM_MAX_STOP_LENGTH"]:
            raise InvalidRequest(f"stop sequences must be at most {settings['LLM_MAX_STOP_LENGTH']} characters", param=stop_param)


def request_sampling(data: dict[str, Any]) -> dict[str, Any]:
    """temperature/top_p/top_k/repetition_penalty of a validated body; a field the request leaves out (or null) gets
    the server's default: LLM_DEFAULT_*, else the model's generation_config.json, else the API's own."""
    model = served()
    model.model  # noqa: B018 - the defaults come with the model (loaded on first use)
    defaults = model.sampling_defaults
    # a field the request gives wins, also when it is 0 (top_k 0: off)
    return {key: defaults[key] if data.get(key) is None else data[key]
            for key in ("temperature", "top_p", "top_k", "repetition_penalty")}


def completion_budget(requested: int | None, prompt_ids: list[int]) -> int:
    """``requested`` max tokens, or (when the client gave none) the configured default that still fits the context."""
    if requested is not None:
        return requested
    return max(1, min(runtime().settings["LLM_DEFAULT_MAX_TOKENS"], served().context_limit - len(prompt_ids)))


def start_generations(requests: list[GenerationRequest]) -> list[EventStream]:
    """Start every generation, or none: one refused (context too long, queue full) closes those already started."""
    model, streams = served(), []
    try:
        for request in requests:
            streams.append(model.generate(request))
    except Exception:
        for stream in streams:
            stream.close()
        raise
    return streams


def keyed_cache_mark(messages: list, data: dict[str, Any]) -> tuple[int, ...]:
    """OpenAI's ``prompt_cache_key``: requests with a key share their prefix up to the last user message (system,
    tools, examples, earlier turns), so the state after it is worth holding: a cache point of the client's."""
    if not data.get("prompt_cache_key"):
        return ()
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=0)
    return (last_user,) if last_user else ()


def start_chat(chat: ChatRequest, requested_max_tokens: int | None, **options: Any) -> tuple[ChatPrompt, ChatStream]:
    """Render ``chat``, check it, and start its generation; ``options`` are GenerationRequest fields."""
    model = served()
    prompt = render(model.model, chat, cache_points=model.prompt_cache_enabled)
    request = GenerationRequest(prompt.ids, completion_budget(requested_max_tokens, prompt.ids),
                                cache_points=prompt.cache_points, cache_marks=prompt.cache_marks, **options)
    stream = ChatStream(model, chat, prompt, request, reasoning=runtime().settings["LLM_REASONING"])
    return prompt, stream


_SET_ASIDE_LOGGED: set[str] = set()


def set_aside_tools(data: dict[str, Any]) -> None:
    """Tools of kinds this server cannot run (hosted and server tools, see schemas/tools.py): refused with a 400
    when ``LLM_UNSUPPORTED_TOOLS`` is ``reject``; otherwise (``omit``) left out of what the model sees, each kind
    logged once per process and named in the response's ``LLM-Omitted-Tools`` header."""
    kinds = list(dict.fromkeys(getattr(data.get("tools"), "unsupported", [])))
    if not kinds:
        return
    if runtime().settings["LLM_UNSUPPORTED_TOOLS"] == "reject":
        raise InvalidRequest(f"tools of type {', '.join(kinds)} run on the provider's own servers and this server "
                             "cannot run them (LLM_UNSUPPORTED_TOOLS=reject); send function tools only", param="tools")
    for kind in kinds:
        if kind not in _SET_ASIDE_LOGGED:
            _SET_ASIDE_LOGGED.add(kind)
            log.warning("tools of type %r cannot run on this server and are left out of what the model sees "
                        "(logged once; LLM_UNSUPPORTED_TOOLS=reject refuses such requests instead)", kind)
    g.llm_omitted_tools = kinds
