"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

Each route is a schema plus a formatter of the engine's neutral events.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

from flask import Blueprint

from ..engine.generation import Done, Event, Finish, GenerationRequest, Heartbeat, TextDelta, TokenLogprob, collect
from ..errors import InvalidRequest
from ..schemas.common import load
from ..schemas.openai import ChatCompletionRequestSchema, CompletionRequestSchema
from ..sse import KEEPALIVE, event_stream, json_response, sse
from .common import check_limits, check_model, closing, completion_budget, json_body, raise_if_failed, runtime, sampling_defaults
from .errors import speaks

CHAT_SCHEMA = ChatCompletionRequestSchema()
COMPLETION_SCHEMA = CompletionRequestSchema()
FINISH_REASONS = {"stop": "stop", "stop_sequence": "stop", "length": "length", "cancelled": "stop"}


def _sampling(data: dict[str, Any]) -> dict[str, Any]:
    """The request's sampling fields, nulls meaning 'default'."""
    settings = runtime().settings
    n = data.get("n") or 1
    if n > settings["LLM_MAX_N"]:
        raise InvalidRequest(f"n must be at most {settings['LLM_MAX_N']}", param="n")
    return dict(
        **sampling_defaults(data),
        repetition_penalty=data.get("repetition_penalty") or 1.0,
        stop=data.get("stop") or [],
        n=n,
        seed=data.get("seed"),
        min_tokens=data.get("min_tokens") or 0,
    )


def _usage(done: Done) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _token_text(token_id: int) -> str:
    return runtime().model.tokenizer.decode([token_id])


def _chat_logprobs(entries: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> dict[str, Any]:
    content = []
    for entry in entries:
        text = _token_text(entry.token_id)
        content.append({"token": text, "logprob": entry.logprob, "bytes": list(text.encode("utf-8")), "top_logprobs": []})
    return {"content": content, "refusal": None}


def _error_payload(finish: Finish) -> dict[str, Any]:
    return {"error": {"message": f"generation failed: {finish.error}", "type": "server_error", "param": None, "code": None}}


# ----------------------------------------------------------------------------- chat completions
def _template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rendered = []
    for message in messages:
        role = "system" if message["role"] == "developer" else message["role"]
        entry = {"role": role, "content": message.get("content") or ""}
        if message.get("name"):
            entry["name"] = message["name"]
        rendered.append(entry)
    return rendered


@speaks("openai")
def chat_completions():
    data = load(CHAT_SCHEMA, json_body())
    check_model(data["model"])
    check_limits(len(data["messages"]), data.get("max_completion_tokens") or data.get("max_tokens"), data.get("stop"))
    rt = runtime()
    model = rt.model
    prompt_ids = model.encode_chat(_template_messages(data["messages"]))
    max_tokens = completion_budget(data.get("max_completion_tokens") or data.get("max_tokens"), prompt_ids)
    gen = GenerationRequest(prompt_ids, max_tokens, logprobs=bool(data.get("logprobs")), **_sampling(data))
    events = rt.generate(gen)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": data["model"]}
    if data.get("stream"):
        include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
        return event_stream(closing(events, _chat_chunks(events, meta, gen, include_usage)))

    texts, finishes, done, logprobs = collect(events, gen.n)
    raise_if_failed(finishes)
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": texts[i], "refusal": None},
            "logprobs": _chat_logprobs(logprobs[i]) if gen.logprobs else None,
            "finish_reason": FINISH_REASONS[finishes[i].reason],
        }
        for i in range(gen.n)
    ]
    return json_response({**meta, "object": "chat.completion", "choices": choices, "usage": _usage(done),
                          "system_fingerprint": None})


def _chat_chunks(events: Iterator[Event], meta: dict[str, Any], gen: GenerationRequest, include_usage: bool) -> Iterator[str]:
    def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None, logprobs=None) -> str:
        payload = {**meta, "object": "chat.completion.chunk", "system_fingerprint": None,
                   "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
        if include_usage:
            payload["usage"] = None
        return sse(payload)

    for index in range(gen.n):
        yield chunk(index, {"role": "assistant", "content": ""})
    for event in events:
        if isinstance(event, Heartbeat):
            yield KEEPALIVE
        elif isinstance(event, TextDelta):
            yield chunk(event.index, {"content": event.text}, logprobs=_chat_logprobs(event.logprobs) if gen.logprobs else None)
        elif isinstance(event, Finish):
            if event.reason == "error":
                yield sse(_error_payload(event))
                break
            yield chunk(event.index, {}, FINISH_REASONS[event.reason])
        elif isinstance(event, Done) and include_usage:
            yield sse({**meta, "object": "chat.completion.chunk", "system_fingerprint": None, "choices": [], "usage": _usage(event)})
    yield sse("[DONE]")


# ----------------------------------------------------------------------------- completions
def _prompt_ids(prompt: str | list[int]) -> tuple[list[int], str]:
    model = runtime().model
    if isinstance(prompt, str):
        return model.encode_prompt(prompt), prompt
    if any(not 0 <= t < model.tokenizer.vocab_size for t in prompt):
        raise InvalidRequest(f"token ids must be between 0 and {model.tokenizer.vocab_size - 1}", param="prompt")
    return list(prompt), model.tokenizer.decode(prompt)


def _completion_logprobs(entries: list[TokenLogprob] | tuple[TokenLogprob, ...], offset: int) -> dict[str, Any]:
    tokens, offsets = [], []
    for entry in entries:
        offsets.append(offset)
        text = _token_text(entry.token_id)
        tokens.append(text)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": None, "text_offset": offsets}


@speaks("openai")
def completions():
    data = load(COMPLETION_SCHEMA, json_body())
    check_model(data["model"])
    check_limits(len(data["prompt"]), data.get("max_tokens"), data.get("stop"))
    rt = runtime()
    sampling = _sampling(data)
    want_logprobs = data.get("logprobs") is not None
    prompts = [_prompt_ids(p) for p in data["prompt"]]
    requests = [GenerationRequest(ids, data.get("max_tokens") or 16, logprobs=want_logprobs, **sampling) for ids, _ in prompts]
    for gen in requests:
        rt.engine.validate(gen)  # every prompt checked before any starts
    streams = [rt.generate(gen) for gen in requests]
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": data["model"]}
    echo = bool(data.get("echo"))
    n = sampling["n"]
    if data.get("stream"):
        include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
        body = _completion_chunks(streams, [text for _, text in prompts], meta, n, echo, want_logprobs, include_usage)
        return event_stream(closing(streams, body))

    choices, prompt_tokens, completion_tokens = [], 0, 0
    for p, events in enumerate(streams):
        texts, finishes, done, logprobs = collect(events, n)
        raise_if_failed(finishes)
        prompt_tokens += done.prompt_tokens
        completion_tokens += done.completion_tokens
        prefix = prompts[p][1] if echo else ""
        for j in range(n):
            choices.append({
                "index": p * n + j,
                "text": prefix + texts[j],
                "logprobs": _completion_logprobs(logprobs[j], len(prefix)) if want_logprobs else None,
                "finish_reason": FINISH_REASONS[finishes[j].reason],
            })
    usage = _usage(Done(prompt_tokens, completion_tokens))
    return json_response({**meta, "object": "text_completion", "choices": choices, "usage": usage, "system_fingerprint": None})


def _completion_chunks(streams, prompt_texts, meta, n, echo, want_logprobs, include_usage) -> Iterator[str]:
    def chunk(index: int, text: str, finish_reason: str | None = None, logprobs=None) -> str:
        payload = {**meta, "object": "text_completion", "system_fingerprint": None,
                   "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
        if include_usage:
            payload["usage"] = None
        return sse(payload)

    prompt_tokens = completion_tokens = 0
    for p, events in enumerate(streams):
        offsets = [len(prompt_texts[p]) if echo else 0] * n
        if echo:
            for j in range(n):
                yield chunk(p * n + j, prompt_texts[p])
        for event in events:
            if isinstance(event, Heartbeat):
                yield KEEPALIVE
            elif isinstance(event, TextDelta):
                logprobs = _completion_logprobs(event.logprobs, offsets[event.index]) if want_logprobs else None
                offsets[event.index] += len(event.text)
                yield chunk(p * n + event.index, event.text, logprobs=logprobs)
            elif isinstance(event, Finish):
                if event.reason == "error":
                    yield sse(_error_payload(event))
                    yield sse("[DONE]")
                    return
                yield chunk(p * n + event.index, "", FINISH_REASONS[event.reason])
            elif isinstance(event, Done):
                prompt_tokens += event.prompt_tokens
                completion_tokens += event.completion_tokens
    if include_usage:
        yield sse({**meta, "object": "text_completion", "choices": [], "usage": _usage(Done(prompt_tokens, completion_tokens))})
    yield sse("[DONE]")


# ----------------------------------------------------------------------------- models
def _model_object(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": runtime().started, "owned_by": "llm-blueprint"}


@speaks("openai")
def list_models():
    return json_response({"object": "list", "data": [_model_object(runtime().model_id)]})


@speaks("openai")
def get_model(model_id: str):
    check_model(model_id, strict=True)
    return json_response(_model_object(model_id))


def register(bp: Blueprint) -> None:
    bp.add_url_rule("/v1/chat/completions", "openai_chat_completions", chat_completions, methods=["POST"])
    bp.add_url_rule("/v1/completions", "openai_completions", completions, methods=["POST"])
    bp.add_url_rule("/v1/models", "openai_models", list_models, methods=["GET"])
    bp.add_url_rule("/v1/models/<llm_model_id:model_id>", "openai_model", get_model, methods=["GET"])

