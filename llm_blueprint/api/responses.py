"""OpenAI Responses API: /v1/responses (stateless), a schema plus a formatter of the engine's events."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

from flask import Blueprint

from ..engine.generation import Done, Event, Finish, GenerationRequest, Heartbeat, TextDelta, collect
from ..schemas.common import load
from ..schemas.responses_api import ResponsesRequestSchema
from ..sse import KEEPALIVE, event_stream, json_response, sse
from .common import check_limits, check_model, closing, completion_budget, json_body, raise_if_failed, runtime, sampling_defaults
from .errors import speaks

SCHEMA = ResponsesRequestSchema()


def _response(meta: dict[str, Any], status: str, output: list[dict[str, Any]], done: Done | None,
              incomplete: bool = False, error: dict[str, str] | None = None) -> dict[str, Any]:
    usage = None
    if done is not None:
        usage = {"input_tokens": done.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens": done.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": done.prompt_tokens + done.completion_tokens}
    return {**meta, "object": "response", "status": status, "output": output, "usage": usage, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "store": False,
            "text": {"format": {"type": "text"}}}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


@speaks("openai")
def create_response():
    data = load(SCHEMA, json_body())
    check_model(data["model"])
    messages = ([{"role": "system", "content": data["instructions"]}] if data.get("instructions") else []) + data["input"]
    check_limits(len(messages), data.get("max_output_tokens"))
    rt = runtime()
    prompt_ids = rt.model.encode_chat(messages)
    gen = GenerationRequest(prompt_ids, completion_budget(data.get("max_output_tokens"), prompt_ids), **sampling_defaults(data))
    events = rt.generate(gen)
    meta = {"id": f"resp_{uuid.uuid4().hex}", "created_at": int(time.time()), "model": data["model"],
            "instructions": data.get("instructions"), "max_output_tokens": data.get("max_output_tokens"),
            "temperature": gen.temperature, "top_p": gen.top_p, "metadata": data.get("metadata") or {}}
    item_id = f"msg_{uuid.uuid4().hex}"
    if data.get("stream"):
        return event_stream(closing(events, _response_events(events, meta, item_id)))

    texts, finishes, done, _ = collect(events, 1)
    raise_if_failed(finishes)
    incomplete = finishes[0].reason == "length"
    status = "incomplete" if incomplete else "completed"
    return json_response(_response(meta, status, [_message_item(item_id, texts[0], status)], done, incomplete))


def _response_events(events: Iterator[Event], meta: dict[str, Any], item_id: str) -> Iterator[str]:
    sequence = iter(range(1_000_000_000))

    def event(kind: str, **payload: Any) -> str:
        return sse({"type": kind, "sequence_number": next(sequence), **payload}, kind)

    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    yield event("response.created", response=_response(meta, "in_progress", [], None))
    yield event("response.in_progress", response=_response(meta, "in_progress", [], None))
    yield event("response.output_item.added", output_index=0, item=_message_item(item_id, "", "in_progress") | {"content": []})
    yield event("response.content_part.added", item_id=item_id, output_index=0, content_index=0, part=part)
    texts: list[str] = []
    finish: Finish | None = None
    for item in events:
        if isinstance(item, Heartbeat):
            yield KEEPALIVE
        elif isinstance(item, TextDelta):
            texts.append(item.text)
            yield event("response.output_text.delta", item_id=item_id, output_index=0, content_index=0, delta=item.text, logprobs=[])
        elif isinstance(item, Finish):
            finish = item
            if item.reason == "error":
                error = {"code": "server_error", "message": f"generation failed: {item.error}"}
                yield event("response.failed", response=_response(meta, "failed", [], None, error=error))
                return
        elif isinstance(item, Done) and finish is not None:
            text = "".join(texts)
            incomplete = finish.reason == "length"
            status = "incomplete" if incomplete else "completed"
            yield event("response.output_text.done", item_id=item_id, output_index=0, content_index=0, text=text, logprobs=[])
            yield event("response.content_part.done", item_id=item_id, output_index=0, content_index=0, part={**part, "text": text})
            message = _message_item(item_id, text, status)
            yield event("response.output_item.done", output_index=0, item=message)
            yield event(f"response.{status}", response=_response(meta, status, [message], item, incomplete))


def register(bp: Blueprint) -> None:
    bp.add_url_rule("/v1/responses", "openai_responses", create_response, methods=["POST"])
