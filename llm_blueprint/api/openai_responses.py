"""OpenAI Responses API: /v1/responses (stateless), a schema plus a formatter of the chat pipeline's events."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from typing import Any

from flask import Blueprint

from ..chat.conversation import (
    Message,
    ToolCallRecord,
    ToolChoice,
    arguments_object,
    chat_request,
    check_tool_history,
    make_tools,
    response_format,
)
from ..chat.pipeline import ChoiceResult, collect_chat
from ..engine.tokenizer import Tokenizer
from ..events import MAX_TOKENS, Done, Finish, Heartbeat, ReasoningDelta, TextDelta, ToolCall, ToolCallDelta
from ..schemas.common import load
from ..schemas.openai_responses import ResponsesRequestSchema
from ..schemas.response_bodies import Response
from .common import (
    check_limits,
    check_model,
    json_body,
    json_response,
    keyed_cache_mark,
    request_sampling,
    served,
    set_aside_tools,
    start_chat,
)
from .errors import error_envelope, openai_body
from .loading import while_loading
from .openai import token_logprobs
from .openapi import OPENAI_ERRORS, documented
from .sse import KEEPALIVE, event_stream, sse

SCHEMA = ResponsesRequestSchema()
LOGPROBS_INCLUDE = "message.output_text.logprobs"


def _history(data: dict[str, Any]) -> list[Message]:
    messages = [Message("system", data["instructions"])] if data.get("instructions") else []
    for item in data["input"]:
        if item["type"] == "message":
            messages.append(Message(item["role"], item["content"]))
        elif item["type"] == "function_call":
            call = ToolCallRecord(item["call_id"], item["name"], arguments_object(item["arguments"], f"{item['where']}.arguments"))
            if messages and messages[-1].role == "assistant":  # calls following an assistant message are the same turn
                messages[-1].tool_calls.append(call)
            else:
                messages.append(Message("assistant", "", [call]))
        else:
            messages.append(Message("tool", item["output"], tool_call_id=item["call_id"], origin=item["where"]))
    check_tool_history(messages)
    return messages


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _message_item(item_id: str, text: str, status: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "status": status, "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


Namespaces = dict[str, tuple[str, str]]  # the model's name of a namespaced function -> (namespace, its own name)


def _call_item(item_id: str, call: ToolCall, status: str = "completed", namespaces: Namespaces | None = None) -> dict[str, Any]:
    item = {"type": "function_call", "id": item_id, "status": status, "call_id": call.id, "name": call.name,
            "arguments": call.arguments if status == "completed" else ""}
    if namespaces and call.name in namespaces:  # Codex: a namespace's function is called by namespace and name
        item["namespace"], item["name"] = namespaces[call.name]
    return item


def _namespaces(data: dict[str, Any]) -> Namespaces:
    return {t["name"]: (t["namespace"], t["name"][len(t["namespace"]):]) for t in data.get("tools") or [] if t.get("namespace")}


def _output(result: ChoiceResult, status: str, tokenizer: Tokenizer | None, namespaces: Namespaces) -> list[dict[str, Any]]:
    items = [_reasoning_item(_new_id("rs"), result.reasoning, "completed")] if result.reasoning else []
    if result.text or not result.tool_calls:
        logprobs = token_logprobs(result.logprobs, tokenizer) if tokenizer else None
        items.append(_message_item(_new_id("msg"), result.text, status, logprobs))
    return items + [_call_item(_new_id("fc"), call, namespaces=namespaces) for call in result.tool_calls]


def _status(finish: Finish) -> str:
    return "incomplete" if finish.ending == MAX_TOKENS else "completed"


class _ResponseFields:
    """The response object's fields: the request's settings echoed, plus status, output and usage."""

    def __init__(self, data: dict[str, Any], temperature: float, top_p: float):
        fmt = ((data.get("text") or {}).get("format")) or {"type": "text"}
        mode, name = data.get("tool_choice") or ("auto", None)
        self.meta = {
            "id": _new_id("resp"), "created_at": int(time.time()), "model": data["model"],
            "instructions": data.get("instructions"), "max_output_tokens": data.get("max_output_tokens"),
            "temperature": temperature, "top_p": top_p, "metadata": data.get("metadata") or {},
            "parallel_tool_calls": data.get("parallel_tool_calls") is not False,
            "tool_choice": {"type": "function", "name": name} if name else mode,
            "tools": [{"type": "function", "name": t["name"], "description": t.get("description"),
                       "parameters": t.get("parameters"), "strict": t.get("strict")} for t in data.get("tools") or []
                      if not t.get("namespace")],
            "store": False, "text": {"format": fmt}, "top_logprobs": data.get("top_logprobs"),
        }

    def response(self, status: str, output: list[dict[str, Any]], done: Done | None,
                 error: dict[str, str] | None = None) -> dict[str, Any]:
        usage = None
        if done is not None:
            usage = {"input_tokens": done.prompt_tokens, "input_tokens_details": {"cached_tokens": done.cached_tokens,
                                                                              "cache_write_tokens": done.cache_write_tokens},
                     "output_tokens": done.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": done.prompt_tokens + done.completion_tokens}
        return {**self.meta, "object": "response", "status": status, "output": output, "usage": usage, "error": error,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None}


@while_loading
@error_envelope("openai")
@documented("createResponse", Response, body=ResponsesRequestSchema, errors=OPENAI_ERRORS, stream=True)
def create_response():
    data = load(SCHEMA, json_body())
    check_model(data["model"])
    set_aside_tools(data)
    messages = _history(data)
    check_limits(len(messages), data.get("max_output_tokens"), tools=len(data.get("tools") or []))
    fmt = (data.get("text") or {}).get("format") or {}
    tools = make_tools([(t["name"], t.get("description"), t.get("parameters"), f"tools[{i}]") for i, t in enumerate(data.get("tools") or [])])
    choice = ToolChoice(*(data.get("tool_choice") or ("auto", None)), parallel=data.get("parallel_tool_calls") is not False)
    chat = chat_request(messages, tools, choice, response_format(fmt.get("type"), fmt.get("schema"), fmt.get("name"), "text.format.schema"),
                        cache_marks=keyed_cache_mark(messages, data))
    # Logprobs when `include` asks for them or `top_logprobs` is given (either alone is enough here).
    top = data.get("top_logprobs") or 0
    want_logprobs = LOGPROBS_INCLUDE in (data.get("include") or []) or data.get("top_logprobs") is not None
    _, events = start_chat(chat, data.get("max_output_tokens"), logprobs=want_logprobs, top_logprobs=top,
                           **request_sampling(data))
    fields = _ResponseFields(data, events.request.temperature, events.request.top_p)
    tokenizer = served().model.tokenizer if want_logprobs else None  # resolved here: a stream runs outside the app
    if data.get("stream"):
        stream = _ResponseStream(fields, tokenizer, _namespaces(data))
        return event_stream(stream.body(events), events, stream.failed)

    results, done = collect_chat(events, 1)
    results[0].finish.raise_failure()
    status = _status(results[0].finish)
    return json_response(fields.response(status, _output(results[0], status, tokenizer, _namespaces(data)), done))


class _Items:
    """The stream's output items, each opened when its first delta arrives and closed when another kind starts."""

    def __init__(self, event, tokenizer: Tokenizer | None, namespaces: Namespaces | None = None):
        self.event = event  # makes one numbered SSE event
        self.tokenizer = tokenizer  # given when the request asked for logprobs
        self.namespaces = namespaces or {}
        self.done: list[dict[str, Any]] = []
        self.kind: str | None = None
        self.item_id = ""
        self.parts: list[str] = []
        self.logprobs: list[dict[str, Any]] = []

    @property
    def index(self) -> int:
        return len(self.done)

    def text(self, delta: str, logprobs=()) -> Iterator[str]:
        if self.kind != "message":
            yield from self.close()
            self.kind, self.item_id = "message", _new_id("msg")
            yield self.event("response.output_item.added", output_index=self.index,
                             item=_message_item(self.item_id, "", "in_progress") | {"content": []})
            yield self.event("response.content_part.added", item_id=self.item_id, output_index=self.index, content_index=0,
                             part=_message_item("", "", "")["content"][0])
        self.parts.append(delta)
        entries = token_logprobs(logprobs, self.tokenizer) if self.tokenizer else []
        self.logprobs.extend(entries)
        yield self.event("response.output_text.delta", item_id=self.item_id, output_index=self.index, content_index=0,
                         delta=delta, logprobs=entries)

    def reasoning(self, delta: str) -> Iterator[str]:
        if self.kind != "reasoning":
            yield from self.close()
            self.kind, self.item_id = "reasoning", _new_id("rs")
            yield self.event("response.output_item.added", output_index=self.index,
                             item=_reasoning_item(self.item_id, "", "in_progress") | {"content": []})
        self.parts.append(delta)
        yield self.event("response.reasoning_text.delta", item_id=self.item_id, output_index=self.index, content_index=0, delta=delta)

    def call_delta(self, delta: ToolCallDelta) -> Iterator[str]:
        """A piece of a call's arguments as it is generated; :meth:`call` completes it."""
        if self.kind != f"call {delta.id}":
            yield from self.close()
            self.kind, self.item_id = f"call {delta.id}", _new_id("fc")
            call = ToolCall(delta.index, delta.call_index, delta.id, delta.name, "", ())
            item = _call_item(self.item_id, call, "in_progress", self.namespaces)
            yield self.event("response.output_item.added", output_index=self.index, item=item)
        yield self.event("response.function_call_arguments.delta", item_id=self.item_id, output_index=self.index, delta=delta.fragment)

    def call(self, call: ToolCall) -> Iterator[str]:
        if self.kind == f"call {call.id}":  # its arguments were streamed already
            item_id, self.kind = self.item_id, None
        else:
            yield from self.close()
            item_id = _new_id("fc")
            yield self.event("response.output_item.added", output_index=self.index, item=_call_item(item_id, call, "in_progress", self.namespaces))
            for fragment in call.fragments:
                yield self.event("response.function_call_arguments.delta", item_id=item_id, output_index=self.index, delta=fragment)
        item = _call_item(item_id, call, namespaces=self.namespaces)
        yield self.event("response.function_call_arguments.done", item_id=item_id, output_index=self.index,
                         arguments=call.arguments, name=item["name"])
        yield self.event("response.output_item.done", output_index=self.index, item=item)
        self.done.append(item)

    def close(self, status: str = "completed") -> Iterator[str]:
        if self.kind is None or self.kind.startswith("call "):  # an unfinished call (cut) is not an output item
            self.kind = None
            return
        text, index = "".join(self.parts), self.index
        if self.kind == "message":
            item = _message_item(self.item_id, text, status, self.logprobs)
            yield self.event("response.output_text.done", item_id=self.item_id, output_index=index, content_index=0,
                             text=text, logprobs=self.logprobs)
            yield self.event("response.content_part.done", item_id=self.item_id, output_index=index, content_index=0,
                             part=item["content"][0])
        else:
            item = _reasoning_item(self.item_id, text, "completed")
            yield self.event("response.reasoning_text.done", item_id=self.item_id, output_index=index, content_index=0, text=text)
        yield self.event("response.output_item.done", output_index=index, item=item)
        self.done.append(item)
        self.kind, self.parts, self.logprobs = None, [], []


class _ResponseStream:
    """One response's stream: numbered events, and the output items so far (so that it can fail at any point)."""

    def __init__(self, fields: _ResponseFields, tokenizer: Tokenizer | None = None, namespaces: Namespaces | None = None):
        self.fields = fields
        self._sequence = itertools.count()
        self.items = _Items(self.event, tokenizer, namespaces)

    def event(self, kind: str, **payload: Any) -> str:
        return sse({"type": kind, "sequence_number": next(self._sequence), **payload}, kind)

    def body(self, events: Iterator[Any]) -> Iterator[str]:
        fields, items, event = self.fields, self.items, self.event
        yield event("response.created", response=fields.response("in_progress", [], None))
        yield event("response.in_progress", response=fields.response("in_progress", [], None))
        finish: Finish | None = None
        for item in events:
            if isinstance(item, Heartbeat):
                yield KEEPALIVE
            elif isinstance(item, TextDelta):
                yield from items.text(item.text, item.logprobs)
            elif isinstance(item, ReasoningDelta):
                yield from items.reasoning(item.text)
            elif isinstance(item, ToolCallDelta):
                yield from items.call_delta(item)
            elif isinstance(item, ToolCall):
                yield from items.call(item)
            elif isinstance(item, Finish):
                item.raise_failure()  # ended with response.failed by the stream's wrapper
                finish = item
            elif isinstance(item, Done) and finish is not None:
                status = _status(finish)
                if items.kind is None and not items.done:  # nothing was generated: still one (empty) message
                    yield from items.text("")
                yield from items.close(status)
                yield event(f"response.{status}", response=fields.response(status, items.done, item))

    def failed(self, exc: Exception, request_id: str | None) -> Iterator[str]:
        """The stream's end after a failure: ``response.failed`` with the items completed so far."""
        error = openai_body(exc, request_id)[1]["error"]
        failure = {"code": error["type"], "message": error["message"]}
        yield self.event("response.failed", response=self.fields.response("failed", self.items.done, None, error=failure))


def register(bp: Blueprint) -> None:
    bp.add_url_rule("/v1/responses", "openai_responses", create_response, methods=["POST"])
