"""Anthropic-compatible routes: /v1/messages and /v1/messages/count_tokens.

A schema plus a formatter of the engine's neutral events, like the OpenAI side.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

from flask import Blueprint

from ..engine.generation import Done, Event, Finish, GenerationRequest, Heartbeat, TextDelta, collect
from ..schemas.anthropic import CountTokensSchema, MessagesRequestSchema
from ..schemas.common import load
from ..sse import event_stream, json_response, sse
from .common import check_limits, check_model, closing, json_body, raise_if_failed, runtime, sampling_defaults
from .errors import speaks

MESSAGES_SCHEMA = MessagesRequestSchema()
COUNT_SCHEMA = CountTokensSchema()
STOP_REASONS = {"stop": "end_turn", "stop_sequence": "stop_sequence", "length": "max_tokens", "cancelled": "end_turn"}


def _prompt_ids(data: dict[str, Any]) -> list[int]:
    messages = [{"role": "system", "content": data["system"]}] if data.get("system") else []
    messages += [{"role": m["role"], "content": m["content"]} for m in data["messages"]]
    return runtime().model.encode_chat(messages)


def _message(meta: dict[str, Any], content: list[dict[str, Any]], stop_reason: str | None, stop_sequence: str | None,
             input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {**meta, "type": "message", "role": "assistant", "content": content, "stop_reason": stop_reason,
            "stop_sequence": stop_sequence, "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}}


@speaks("anthropic")
def messages():
    data = load(MESSAGES_SCHEMA, json_body())
    check_model(data["model"])
    check_limits(len(data["messages"]), data["max_tokens"], data.get("stop_sequences"), stop_param="stop_sequences")
    rt = runtime()
    prompt_ids = _prompt_ids(data)
    gen = GenerationRequest(prompt_ids, data["max_tokens"], stop=data.get("stop_sequences") or [], **sampling_defaults(data))
    events = rt.generate(gen)
    meta = {"id": f"msg_{uuid.uuid4().hex}", "model": data["model"]}
    if data.get("stream"):
        return event_stream(closing(events, _message_events(events, meta, len(prompt_ids))))

    texts, finishes, done, _ = collect(events, 1)
    raise_if_failed(finishes)
    finish = finishes[0]
    content = [{"type": "text", "text": texts[0]}] if texts[0] else []
    return json_response(_message(meta, content, STOP_REASONS[finish.reason], finish.stop_sequence,
                                  done.prompt_tokens, done.completion_tokens))


def _message_events(events: Iterator[Event], meta: dict[str, Any], input_tokens: int) -> Iterator[str]:
    yield sse({"type": "message_start", "message": _message(meta, [], None, None, input_tokens, 0)}, "message_start")
    yield sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}, "content_block_start")
    finish: Finish | None = None
    for event in events:
        if isinstance(event, Heartbeat):
            yield sse({"type": "ping"}, "ping")
        elif isinstance(event, TextDelta):
            delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": event.text}}
            yield sse(delta, "content_block_delta")
        elif isinstance(event, Finish):
            finish = event
            if event.reason == "error":
                error = {"type": "error", "error": {"type": "api_error", "message": f"generation failed: {event.error}"}}
                yield sse(error, "error")
                return
        elif isinstance(event, Done) and finish is not None:
            yield sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
            delta = {"type": "message_delta",
                     "delta": {"stop_reason": STOP_REASONS[finish.reason], "stop_sequence": finish.stop_sequence},
                     "usage": {"input_tokens": event.prompt_tokens, "output_tokens": event.completion_tokens}}
            yield sse(delta, "message_delta")
            yield sse({"type": "message_stop"}, "message_stop")


@speaks("anthropic")
def count_tokens():
    data = load(COUNT_SCHEMA, json_body())
    check_model(data["model"])
    check_limits(len(data["messages"]))
    return json_response({"input_tokens": len(_prompt_ids(data))})


def register(bp: Blueprint) -> None:
    bp.add_url_rule("/v1/messages", "anthropic_messages", messages, methods=["POST"])
    bp.add_url_rule("/v1/messages/count_tokens", "anthropic_count_tokens", count_tokens, methods=["POST"])
