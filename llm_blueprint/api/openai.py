"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

Each route is a schema plus a formatter of the engine's neutral events.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterator
from typing import Any

from flask import Blueprint

from ..chat.conversation import (
    ChatRequest,
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
from ..errors import InvalidRequest
from ..events import (
    END_TURN,
    MAX_TOKENS,
    STOP_SEQUENCE,
    TOOL_USE,
    Done,
    Finish,
    GenerationRequest,
    Heartbeat,
    ReasoningDelta,
    TextDelta,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    collect,
)
from ..schemas.common import load
from ..schemas.openai import ChatCompletionRequestSchema, CompletionRequestSchema
from ..schemas.response_bodies import ChatCompletion, ModelList, ModelObject, TextCompletion
from .common import (
    check_limits,
    check_model,
    json_body,
    json_response,
    keyed_cache_mark,
    request_sampling,
    runtime,
    served,
    set_aside_tools,
    start_chat,
    start_generations,
)
from .errors import error_envelope, openai_stream_failure
from .loading import while_loading
from .openapi import OPENAI_ERRORS, documented
from .sse import KEEPALIVE, event_stream, sse

CHAT_SCHEMA = ChatCompletionRequestSchema()
COMPLETION_SCHEMA = CompletionRequestSchema()
FINISH_REASONS = {END_TURN: "stop", STOP_SEQUENCE: "stop", MAX_TOKENS: "length", TOOL_USE: "tool_calls"}


def _generation_options(data: dict[str, Any]) -> dict[str, Any]:
    """The request's sampling fields, nulls meaning 'default'."""
    return dict(
        **request_sampling(data),
        stop=data.get("stop") or [],
        n=data.get("n") or 1,
        seed=data.get("seed"),
        min_tokens=data.get("min_tokens") or 0,
    )


def _usage(done: Done) -> dict[str, Any]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens, "cache_write_tokens": done.cache_write_tokens}}


def _added(total: Done, done: Done) -> Done:
    return Done(*(a + b for a, b in zip(dataclasses.astuple(total), dataclasses.astuple(done), strict=True)))


# The tokenizer is resolved in the view and handed to the formatters: a stream's body runs outside the app context.


def _token_logprob(tokenizer: Tokenizer, token_id: int, logprob: float) -> dict[str, Any]:
    return {"token": tokenizer.decode([token_id]), "logprob": logprob, "bytes": list(tokenizer.token_bytes(token_id))}


def token_logprobs(entries: tuple[TokenLogprob, ...] | list[TokenLogprob], tokenizer: Tokenizer) -> list[dict[str, Any]]:
    """Chat's (and Responses') log-probability entries: token, logprob, bytes and the ``top_logprobs`` alternatives."""
    return [{**_token_logprob(tokenizer, entry.token_id, entry.logprob),
             "top_logprobs": [_token_logprob(tokenizer, i, lp) for i, lp in entry.top]} for entry in entries]


def _chat_logprobs(entries: tuple[TokenLogprob, ...] | list[TokenLogprob], tokenizer: Tokenizer) -> dict[str, Any]:
    return {"content": token_logprobs(entries, tokenizer), "refusal": None}


# ----------------------------------------------------------------------------- chat completions
def _history(raw_messages: list[dict[str, Any]]) -> list[Message]:
    messages = []
    for i, m in enumerate(raw_messages):
        role = "system" if m["role"] == "developer" else m["role"]
        calls = [ToolCallRecord(c["id"], c["function"]["name"],
                                arguments_object(c["function"]["arguments"], f"messages[{i}].tool_calls[{j}].function.arguments"))
                 for j, c in enumerate(m.get("tool_calls") or [])]
        messages.append(Message(role, m.get("content") or "", calls, tool_call_id=m.get("tool_call_id"),
                                name=m.get("name") if role == "tool" else None, origin=f"messages[{i}]"))
    check_tool_history(messages)
    return messages


def _chat_request(data: dict[str, Any]) -> ChatRequest:
    tools = make_tools([(t["function"]["name"], t["function"].get("description"), t["function"].get("parameters"),
                         f"tools[{i}].function") for i, t in enumerate(data.get("tools") or [])])
    fmt = data.get("response_format") or {}
    spec = fmt.get("json_schema") or {}
    json_format = response_format(fmt.get("type"), spec.get("schema"), spec.get("name"), "response_format.json_schema.schema")
    choice = ToolChoice(*(data.get("tool_choice") or ("auto", None)), parallel=data.get("parallel_tool_calls") is not False)
    messages = _history(data["messages"])
    return chat_request(messages, tools, choice, json_format, cache_marks=keyed_cache_mark(messages, data))


def _tool_call_json(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _chat_message(result: ChoiceResult) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": result.text or (None if result.tool_calls else ""), "refusal": None}
    if result.reasoning:
        message["reasoning_content"] = result.reasoning
    if result.tool_calls:
        message["tool_calls"] = [_tool_call_json(c) for c in result.tool_calls]
    return message


@while_loading
@error_envelope("openai")
@documented("createChatCompletion", ChatCompletion, body=ChatCompletionRequestSchema, errors=OPENAI_ERRORS, stream=True)
def chat_completions():
    data = load(CHAT_SCHEMA, json_body())
    check_model(data["model"])
    set_aside_tools(data)
    check_limits(len(data["messages"]), data.get("max_completion_tokens") or data.get("max_tokens"), data.get("stop"),
                 n=data.get("n") or 1, tools=len(data.get("tools") or []))
    chat = _chat_request(data)
    want_logprobs = bool(data.get("logprobs"))
    if data.get("top_logprobs") and not want_logprobs:
        raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
    _, events = start_chat(chat, data.get("max_completion_tokens") or data.get("max_tokens"), logprobs=want_logprobs,
                           top_logprobs=data.get("top_logprobs") or 0, **_generation_options(data))
    n = events.request.n
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": data["model"],
            "system_fingerprint": served().system_fingerprint}
    tokenizer = served().model.tokenizer
    if data.get("stream"):
        include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
        body = _chat_chunks(events, meta, n, tokenizer if want_logprobs else None, include_usage)
        return event_stream(body, events, openai_stream_failure)

    results, done = collect_chat(events, n)
    for result in results:
        result.finish.raise_failure()
    choices = [
        {
            "index": i,
            "message": _chat_message(result),
            "logprobs": _chat_logprobs(result.logprobs, tokenizer) if want_logprobs else None,
            "finish_reason": FINISH_REASONS[result.finish.ending],
        }
        for i, result in enumerate(results)
    ]
    return json_response({**meta, "object": "chat.completion", "choices": choices, "usage": _usage(done)})


def _stream_chunk(meta: dict[str, Any], include_usage: bool, choice: dict[str, Any] | None, usage: Done | None = None) -> str:
    """One chunk of a chat or completion stream: ``meta`` (id, object, created, model) and one choice, or none and the
    usage (the last chunk, when ``stream_options.include_usage`` asked for it: the others carry ``"usage": null``)."""
    payload = {**meta, "choices": [choice] if choice else []}
    if include_usage:
        payload["usage"] = _usage(usage) if usage else None
    return sse(payload)


def _chat_chunks(events: Iterator[Any], meta: dict[str, Any], n: int, tokenizer: Tokenizer | None,
                 include_usage: bool) -> Iterator[str]:
    """The chunks of a chat completion stream; logprobs when ``tokenizer`` is given."""
    meta = {**meta, "object": "chat.completion.chunk"}

    def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None, logprobs=None) -> str:
        return _stream_chunk(meta, include_usage, {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason})

    for index in range(n):
        yield chunk(index, {"role": "assistant", "content": ""})
    streamed_calls: set[tuple[int, int]] = set()  # calls whose arguments went out as they were generated
    for event in events:
        if isinstance(event, Heartbeat):
            yield KEEPALIVE
        elif isinstance(event, TextDelta):
            yield chunk(event.index, {"content": event.text}, logprobs=_chat_logprobs(event.logprobs, tokenizer) if tokenizer else None)
        elif isinstance(event, ReasoningDelta):
            yield chunk(event.index, {"reasoning_content": event.text})
        elif isinstance(event, (ToolCall, ToolCallDelta)):
            key = (event.index, event.call_index)
            if key not in streamed_calls:
                opening = {"index": event.call_index, "id": event.id, "type": "function", "function": {"name": event.name, "arguments": ""}}
                yield chunk(event.index, {"tool_calls": [opening]})
            if isinstance(event, ToolCallDelta):
                streamed_calls.add(key)
            fragments = [event.fragment] if isinstance(event, ToolCallDelta) else () if key in streamed_calls else event.fragments
            for fragment in fragments:
                yield chunk(event.index, {"tool_calls": [{"index": event.call_index, "function": {"arguments": fragment}}]})
        elif isinstance(event, Finish):
            event.raise_failure()  # ended by the stream's wrapper with an error chunk and [DONE]
            yield chunk(event.index, {}, FINISH_REASONS[event.ending])
        elif isinstance(event, Done) and include_usage:
            yield _stream_chunk(meta, include_usage, None, event)
    yield sse("[DONE]")


# ----------------------------------------------------------------------------- completions
def _prompt_ids(prompt: str | list[int]) -> tuple[list[int], str]:
    model = served().model
    if isinstance(prompt, str):
        return model.encode_prompt(prompt), prompt
    if any(not 0 <= t < model.tokenizer.vocab_size for t in prompt):
        raise InvalidRequest(f"token ids must be between 0 and {model.tokenizer.vocab_size - 1}", param="prompt")
    return list(prompt), model.tokenizer.decode(prompt)


def _completion_logprobs(entries: list[TokenLogprob] | tuple[TokenLogprob, ...], offset: int, tokenizer: Tokenizer,
                         top: int, first_id: int | None = None) -> dict[str, Any]:
    """The legacy ``logprobs`` object of ``entries``, whose text starts at ``offset``; ``first_id`` is an echoed
    prompt's first token, listed first with null (nothing comes before it to score it by), as the API does."""
    ids = ([first_id] if first_id is not None else []) + [e.token_id for e in entries]
    tokens, offsets = [], []
    for token_id in ids:
        offsets.append(offset)
        text = tokenizer.decode([token_id])
        tokens.append(text)
        offset += len(text)
    head: list[Any] = [None] if first_id is not None else []
    alternatives = head + [{tokenizer.decode([i]): lp for i, lp in e.top} for e in entries] if top else None
    return {"tokens": tokens, "token_logprobs": head + [e.logprob for e in entries], "top_logprobs": alternatives,
            "text_offset": offsets}


def _echo_logprobs(prompt_ids: list[int], top: int, tokenizer: Tokenizer) -> dict[str, Any]:
    """An echoed prompt's tokens, scored by the model's own prompt log-probabilities."""
    if not prompt_ids:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [] if top else None, "text_offset": []}
    return _completion_logprobs(served().prompt_logprobs(prompt_ids, top), 0, tokenizer, top, prompt_ids[0])


def _joined(prompt: dict[str, Any] | None, generated: dict[str, Any]) -> dict[str, Any]:
    if prompt is None:
        return generated
    return {key: (prompt[key] + generated[key]) if prompt[key] is not None else None for key in generated}


@while_loading
@error_envelope("openai")
@documented("createCompletion", TextCompletion, body=CompletionRequestSchema, errors=OPENAI_ERRORS, stream=True)
def completions():
    data = load(COMPLETION_SCHEMA, json_body())
    check_model(data["model"])
    check_limits(len(data["prompt"]), data.get("max_tokens"), data.get("stop"), n=data.get("n") or 1)
    model = served()
    sampling = _generation_options(data)
    want_logprobs = data.get("logprobs") is not None
    top = data.get("logprobs") or 0
    prompts = [_prompt_ids(p) for p in data["prompt"]]
    requests = [GenerationRequest(ids, data.get("max_tokens") or 16, logprobs=want_logprobs, top_logprobs=top, **sampling)
                for ids, _ in prompts]
    streams = start_generations(requests)
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": data["model"],
            "system_fingerprint": model.system_fingerprint}
    echo = bool(data.get("echo"))
    n = sampling["n"]
    tokenizer = model.model.tokenizer
    echoed = [_echo_logprobs(ids, top, tokenizer) if echo and want_logprobs else None for ids, _ in prompts]
    if data.get("stream"):
        include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
        body = _completion_chunks(streams, [text for _, text in prompts], meta, n, echo, tokenizer if want_logprobs else None,
                                  top, include_usage, echoed)
        return event_stream(body, streams, openai_stream_failure)

    choices, total = [], Done(0, 0)
    for p, events in enumerate(streams):
        texts, finishes, done, logprobs = collect(events, n)
        for finish in finishes:
            finish.raise_failure()
        total = _added(total, done)
        prefix = prompts[p][1] if echo else ""
        for j in range(n):
            choices.append({
                "index": p * n + j,
                "text": prefix + texts[j],
                "logprobs": _joined(echoed[p], _completion_logprobs(logprobs[j], len(prefix), tokenizer, top))
                if want_logprobs else None,
                "finish_reason": FINISH_REASONS[finishes[j].ending],
            })
    usage = _usage(total)
    return json_response({**meta, "object": "text_completion", "choices": choices, "usage": usage})


def _completion_chunks(streams, prompt_texts, meta, n, echo, tokenizer: Tokenizer | None, top: int,
                       include_usage, echoed: list[dict[str, Any] | None]) -> Iterator[str]:
    """The chunks of a completion stream; logprobs when ``tokenizer`` is given (``echoed``: each echoed prompt's)."""
    meta = {**meta, "object": "text_completion"}

    def chunk(index: int, text: str, finish_reason: str | None = None, logprobs=None) -> str:
        return _stream_chunk(meta, include_usage, {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason})

    total = Done(0, 0)
    for p, events in enumerate(streams):
        offsets = [len(prompt_texts[p]) if echo else 0] * n
        if echo:
            for j in range(n):
                yield chunk(p * n + j, prompt_texts[p], logprobs=echoed[p])
        for event in events:
            if isinstance(event, Heartbeat):
                yield KEEPALIVE
            elif isinstance(event, TextDelta):
                logprobs = _completion_logprobs(event.logprobs, offsets[event.index], tokenizer, top) if tokenizer else None
                offsets[event.index] += len(event.text)
                yield chunk(p * n + event.index, event.text, logprobs=logprobs)
            elif isinstance(event, Finish):
                event.raise_failure()  # ended by the stream's wrapper with an error chunk and [DONE]
                yield chunk(p * n + event.index, "", FINISH_REASONS[event.ending])
            elif isinstance(event, Done):
                total = _added(total, event)
    if include_usage:
        yield _stream_chunk(meta, include_usage, None, total)
    yield sse("[DONE]")


# ----------------------------------------------------------------------------- models
def _model_object(model_id: str) -> dict[str, Any]:
    """OpenAI's model object, with this server's ``kind`` (chat, embedding, rerank) and ``status`` (loaded, loading,
    unloaded: loads on its next request, failed: with ``error``)."""
    rt = runtime()
    if model_id in rt.chat.models:
        state = rt.chat.models[model_id].status()
    else:
        state = rt.registry.status().get(model_id) or {"kind": rt.registry.kind_of(model_id), "status": "unloaded"}
    return {"id": model_id, "object": "model", "created": rt.started, "owned_by": "llm-blueprint", **state}


@error_envelope("openai")
@documented("listModels", ModelList, errors=(401,))
def list_models():
    return json_response({"object": "list", "data": [_model_object(model_id) for model_id, _ in runtime().registry.models()]})


@error_envelope("openai")
@documented("retrieveModel", ModelObject, errors=(401, 404))
def get_model(model_id: str):
    check_model(model_id, strict=True, kind=None)
    return json_response(_model_object(model_id))


def register(bp: Blueprint) -> None:
    bp.add_url_rule("/v1/chat/completions", "openai_chat_completions", chat_completions, methods=["POST"])
    bp.add_url_rule("/v1/completions", "openai_completions", completions, methods=["POST"])
    bp.add_url_rule("/v1/models", "openai_models", list_models, methods=["GET"])
    bp.add_url_rule("/v1/models/<llm_model_id:model_id>", "openai_model", get_model, methods=["GET"])

