"""Anthropic-compatible routes: /v1/messages and /v1/messages/count_tokens.

A schema plus a formatter of the chat pipeline's neutral events, like the OpenAI side.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint

from ..chat.conversation import (
    ChatRequest,
    Message,
    ToolCallRecord,
    ToolChoice,
    chat_request,
    check_tool_history,
    make_tools,
    response_format,
)
from ..chat.pipeline import collect_chat
from ..chat.prompt import render
from ..errors import InvalidRequest
from ..events import (
    END_TURN,
    MAX_TOKENS,
    STOP_SEQUENCE,
    TOOL_USE,
    Done,
    Finish,
    Heartbeat,
    Planned,
    ReasoningDelta,
    TextDelta,
    ToolCall,
    ToolCallDelta,
)
from ..schemas.anthropic import CountTokensRequestSchema, MessagesRequestSchema
from ..schemas.common import load
from ..schemas.response_bodies import AnthropicMessage, TokenCount
from .common import check_limits, check_model, json_body, json_response, request_sampling, runtime, served, set_aside_tools, start_chat
from .errors import anthropic_stream_failure, error_envelope
from .loading import while_loading
from .openapi import ANTHROPIC_ERRORS, documented
from .sse import event_stream, sse

MESSAGES_SCHEMA = MessagesRequestSchema()
COUNT_SCHEMA = CountTokensRequestSchema()
STOP_REASONS = {END_TURN: "end_turn", STOP_SEQUENCE: "stop_sequence", MAX_TOKENS: "max_tokens", TOOL_USE: "tool_use"}
TOOL_CHOICES = {"auto": "auto", "any": "required", "tool": "required", "none": "none"}
_PROCESS_KEY = os.urandom(32)


def _history(data: dict[str, Any], marks: list[int] | None = None) -> list[Message]:
    """The conversation; ``marks`` gets the cache breakpoints (``cache_control``) as counts of leading messages."""
    marks = [] if marks is None else marks
    messages = [Message("system", data["system"])] if data.get("system") else []
    if getattr(data.get("system"), "cached", False) or any(t.get("cache_control") for t in data.get("tools") or []):
        marks.append(len(messages))  # tools and system come first in the prompt
    for i, m in enumerate(data["messages"]):
        blocks = m["content"]
        text = "".join(b["text"] for b in blocks if b["type"] == "text")
        if m["role"] == "system":
            _fold_system(messages, text)
        elif m["role"] == "assistant":
            calls = [ToolCallRecord(b["id"], b["name"], b["input"]) for b in blocks if b["type"] == "tool_use"]
            messages.append(Message("assistant", text, calls))
        else:
            if any(b["type"] == "tool_use" for b in blocks):
                raise InvalidRequest("tool_use blocks belong in assistant messages", param="messages")
            for b in blocks:
                if b["type"] == "tool_result":
                    messages.append(Message("tool", b["content"], tool_call_id=b["tool_use_id"], is_error=b["is_error"],
                                            origin=f"messages[{i}]"))
            if text or not any(b["type"] == "tool_result" for b in blocks):
                messages.append(Message("user", text))
        if any(b.get("cache_control") for b in blocks):
            marks.append(len(messages))  # up to the end of this message
    if data.get("cache_control"):  # automatic caching: a breakpoint at the last block
        marks.append(len(messages))
    check_tool_history(messages)
    return messages


def _fold_system(messages: list[Message], text: str) -> None:
    """A ``role: "system"`` entry among the messages (Claude Code sends its reminders so). Before the first turn it
    joins the system prompt; later it joins the user turn it follows (or opens one), so that every chat template
    can render it (many accept a system message only first) and the prompt's shared beginning, which the prompt
    cache reuses, stays the same from request to request."""
    if not text:
        return
    if all(m.role == "system" for m in messages):
        if messages:
            messages[0] = Message("system", f"{messages[0].content}\n\n{text}")
        else:
            messages.append(Message("system", text))
    elif messages[-1].role == "user":
        messages[-1] = Message("user", f"{messages[-1].content}\n\n{text}")
    else:
        messages.append(Message("user", text))


def _chat_request(data: dict[str, Any]) -> ChatRequest:
    tools = make_tools([(t["name"], t.get("description"), t["input_schema"], f"tools[{i}]") for i, t in enumerate(data.get("tools") or [])],
                       schema_field="input_schema")
    raw_choice = data.get("tool_choice") or {"type": "auto"}
    choice = ToolChoice(TOOL_CHOICES[raw_choice["type"]], raw_choice.get("name"),
                        parallel=not raw_choice.get("disable_parallel_tool_use"))
    thinking = (data.get("thinking") or {}).get("type") in ("enabled", "adaptive")
    output_format = (data.get("output_config") or {}).get("format")
    fmt = response_format("json_schema", output_format["schema"], None, "output_config.format.schema") if output_format else None
    marks: list[int] = []
    messages = _history(data, marks)
    return chat_request(messages, tools, choice, fmt, show_reasoning=thinking, template_options={"enable_thinking": thinking},
                        cache_marks=tuple(marks))


def _signer() -> Callable[[str], str]:
    """Signs thinking text (the API's opaque ``signature``): an HMAC, so a replayed block can be recognized as ours.
    Resolved inside the request: a stream's body runs after the view returned."""
    configured = runtime().settings["LLM_SIGNING_KEY"]
    key = configured.encode() if configured else _PROCESS_KEY
    return lambda thinking: base64.b64encode(hmac.new(key, thinking.encode("utf-8"), hashlib.sha256).digest()).decode("ascii")


def _tool_use_id(call: ToolCall | ToolCallDelta) -> str:
    return "toolu_" + call.id.removeprefix("call_")


def _usage(done: Done) -> dict[str, Any]:
    """The usage fields of the SDK 2.x ``Usage`` type. As Anthropic counts them, ``input_tokens`` are the prompt
    tokens neither read from the prompt cache nor written to it (the three add up to the prompt). A held state
    lives until the cache is full, not for a fixed time: counted as the 5-minute kind."""
    read, written = done.cached_tokens, done.cache_write_tokens
    return {"input_tokens": done.prompt_tokens - read - written, "output_tokens": done.completion_tokens,
            "cache_creation_input_tokens": written, "cache_read_input_tokens": read,
            "cache_creation": {"ephemeral_5m_input_tokens": written, "ephemeral_1h_input_tokens": 0},
            "server_tool_use": None, "service_tier": "standard"}


def _message(meta: dict[str, Any], content: list[dict[str, Any]], stop_reason: str | None, stop_sequence: str | None,
             done: Done) -> dict[str, Any]:
    return {**meta, "type": "message", "role": "assistant", "content": content, "stop_reason": stop_reason,
            "stop_sequence": stop_sequence, "usage": _usage(done)}


@while_loading
@error_envelope("anthropic")
@documented("createMessage", AnthropicMessage, body=MessagesRequestSchema, errors=ANTHROPIC_ERRORS, stream=True)
def messages():
    data = load(MESSAGES_SCHEMA, json_body())
    check_model(data["model"])
    set_aside_tools(data)
    check_limits(len(data["messages"]), data["max_tokens"], data.get("stop_sequences"), stop_param="stop_sequences",
                 tools=len(data.get("tools") or []))
    chat = _chat_request(data)
    prompt, events = start_chat(chat, data["max_tokens"], stop=data.get("stop_sequences") or [], **request_sampling(data))
    meta = {"id": f"msg_{uuid.uuid4().hex}", "model": data["model"]}
    if data.get("stream"):
        sign = _signer() if chat.show_reasoning else None
        return event_stream(_message_events(events, meta, len(prompt.ids), sign), events, anthropic_stream_failure)

    results, done = collect_chat(events, 1)
    result = results[0]
    result.finish.raise_failure()
    content: list[dict[str, Any]] = []
    if result.reasoning and chat.show_reasoning:
        content.append({"type": "thinking", "thinking": result.reasoning, "signature": _signer()(result.reasoning)})
    if result.text:
        content.append({"type": "text", "text": result.text})
    content += [{"type": "tool_use", "id": _tool_use_id(c), "name": c.name, "input": json.loads(c.arguments)} for c in result.tool_calls]
    finish = result.finish
    return json_response(_message(meta, content, STOP_REASONS[finish.ending], finish.stop_sequence, done))


class _Blocks:
    """The stream's content blocks: each opened when its first delta arrives, closed when another kind starts."""

    def __init__(self, sign: Callable[[str], str] | None) -> None:
        self.sign = sign
        self.index = -1
        self.kind: str | None = None
        self.thinking: list[str] = []

    def ensure(self, kind: str, block: dict[str, Any]) -> Iterator[str]:
        if self.kind != kind:
            yield from self.close()
            self.index += 1
            self.kind = kind
            yield sse({"type": "content_block_start", "index": self.index, "content_block": block}, "content_block_start")

    def delta(self, delta: dict[str, Any]) -> str:
        return sse({"type": "content_block_delta", "index": self.index, "delta": delta}, "content_block_delta")

    def close(self) -> Iterator[str]:
        if self.kind is None:
            return
        if self.kind == "thinking":
            yield self.delta({"type": "signature_delta", "signature": self.sign("".join(self.thinking))})
            self.thinking = []
        yield sse({"type": "content_block_stop", "index": self.index}, "content_block_stop")
        self.kind = None


def _message_events(events: Iterator[Any], meta: dict[str, Any], input_tokens: int, sign: Callable[[str], str] | None) -> Iterator[str]:
    """The stream's events; thinking blocks only when ``sign`` is given (thinking asked for). ``message_start`` carries
    the prompt cache's figures, as Anthropic's does, when the engine has planned the request by its first event (at
    once, unless every replica is busy: then after one heartbeat interval, with no cache figures; ``message_delta``
    has them in every case). Nothing else may come first: Anthropic's SDKs refuse any event before it, and Claude
    Code gives up on a stream whose events stop for about 15 s, comments not counted."""
    start, first = Done(input_tokens, 0), next(events, None)
    if isinstance(first, Planned):
        start, first = Done(input_tokens, 0, first.cached_tokens, first.cache_write_tokens), None
    yield sse({"type": "message_start", "message": _message(meta, [], None, None, start)}, "message_start")
    blocks = _Blocks(sign)
    finish: Finish | None = None
    for event in itertools.chain([first] if first is not None else [], events):
        if isinstance(event, Planned):  # a later engine request of the same answer (a tool call's arguments)
            continue
        if isinstance(event, Heartbeat):
            yield sse({"type": "ping"}, "ping")
        elif isinstance(event, ReasoningDelta):
            if sign is not None:
                yield from blocks.ensure("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                blocks.thinking.append(event.text)
                yield blocks.delta({"type": "thinking_delta", "thinking": event.text})
        elif isinstance(event, TextDelta):
            yield from blocks.ensure("text", {"type": "text", "text": ""})
            yield blocks.delta({"type": "text_delta", "text": event.text})
        elif isinstance(event, ToolCallDelta):  # a call streamed as it is generated; its ToolCall closes it
            yield from blocks.ensure(f"tool_use {event.id}", {"type": "tool_use", "id": _tool_use_id(event), "name": event.name, "input": {}})
            yield blocks.delta({"type": "input_json_delta", "partial_json": event.fragment})
        elif isinstance(event, ToolCall):
            streamed = blocks.kind == f"tool_use {event.id}"
            if not streamed:
                yield from blocks.close()
                yield from blocks.ensure("tool_use", {"type": "tool_use", "id": _tool_use_id(event), "name": event.name, "input": {}})
                for fragment in event.fragments:
                    yield blocks.delta({"type": "input_json_delta", "partial_json": fragment})
            yield from blocks.close()
        elif isinstance(event, Finish):
            finish = event
            event.raise_failure()  # ended by the stream's wrapper with an error event
        elif isinstance(event, Done) and finish is not None:
            yield from blocks.close()
            delta = {"type": "message_delta",
                     "delta": {"stop_reason": STOP_REASONS[finish.ending], "stop_sequence": finish.stop_sequence},
                     "usage": _usage(event)}
            yield sse(delta, "message_delta")
            yield sse({"type": "message_stop"}, "message_stop")


@error_envelope("anthropic")
@documented("countTokens", TokenCount, body=CountTokensRequestSchema, errors=ANTHROPIC_ERRORS)
def count_tokens():
    data = load(COUNT_SCHEMA, json_body())
    check_model(data["model"])
    set_aside_tools(data)
    check_limits(len(data["messages"]), tools=len(data.get("tools") or []))
    return json_response({"input_tokens": len(render(served().model, _chat_request(data)).ids)})


def register(bp: Blueprint) -> None:
    bp.add_url_rule("/v1/messages", "anthropic_messages", messages, methods=["POST"])
    bp.add_url_rule("/v1/messages/count_tokens", "anthropic_count_tokens", count_tokens, methods=["POST"])
