"""Every OpenAI body and stream event, raw off the wire, against OpenAI's own published OpenAPI document.

Typed clients in other languages, gateways and schema-validating proxies hold a server to the document, not to
what the Python SDK forgives. The document and its few known deviations from the live API (each written down
with its reason) are in ``openapi_document.py``. Outputs are never pinned: int8 numerics differ between CPUs.
"""

from __future__ import annotations

import json
import math

import pytest
import requests
from openapi_document import DERIVED, LIVE_API_DEVIATIONS, check, errors, stream_event_schemas
from outcomes import wait_idle

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}


def post(server, path: str, body: dict) -> requests.Response:
    return requests.post(server.base + path, json=body, timeout=180)


def sse_events(response: requests.Response) -> list[tuple[str | None, str]]:
    """(event name, data) of each event of a raw SSE body; keep-alive comments skipped."""
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    found = []
    for block in response.text.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        name = next((line[len("event: "):] for line in lines if line.startswith("event: ")), None)
        data = "\n".join(line[len("data: "):] for line in lines if line.startswith("data: "))
        found.append((name, data))
    return found


def chunks(response: requests.Response) -> list[dict]:
    """The JSON chunks of a chat or completion stream, which must end with ``data: [DONE]``."""
    events = sse_events(response)
    assert events[-1] == (None, "[DONE]")
    return [json.loads(data) for _, data in events[:-1]]


def test_the_document_validates_and_its_deviations_are_written_down():
    assert all(why for *_, why in LIVE_API_DEVIATIONS) and all(why for _, patches in DERIVED.values() for *_, why in patches)
    check({"error": {"message": "m", "type": "t", "param": None, "code": None}}, "ErrorResponse")
    assert errors({"error": {"message": "m", "type": "t"}}, "ErrorResponse")  # param and code are required
    assert errors({"object": "model", "id": "x", "created": 1, "owned_by": None}, "Model")
    assert stream_event_schemas()["response.output_text.delta"] == "ResponseTextDeltaEvent"


# ----------------------------------------------------------------------------- chat completions
def _chat_body(body: dict) -> None:
    check(body, "CreateChatCompletionResponse")
    assert isinstance(body["system_fingerprint"], str) and body["system_fingerprint"].startswith("fp_")


def _chat_chunks(response: requests.Response) -> list[dict]:
    found = chunks(response)
    for chunk in found:
        check(chunk, "CreateChatCompletionStreamResponse")
        assert isinstance(chunk["system_fingerprint"], str)
    assert len({c["id"] for c in found}) == 1
    return found


CHAT_MODES = {
    "plain": {},
    "n2": {"n": 2, "temperature": 0.8, "seed": 3},
    "logprobs": {"logprobs": True, "top_logprobs": 3},
    "json_object": {"response_format": {"type": "json_object"}},
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}},
    "tools_auto": {"tools": [WEATHER]},
    "tools_forced": {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    "usage": {"stream_options": {"include_usage": True}},
}


def _structured(mode: str) -> bool:
    return mode.startswith(("json", "tools_forced"))


@pytest.mark.parametrize("mode", CHAT_MODES)
def test_chat_completion_body(api_server, mode):
    extra = {k: v for k, v in CHAT_MODES[mode].items() if k != "stream_options"}
    response = post(api_server, "/v1/chat/completions", {"model": "smollm2", "messages": QUESTION, "max_tokens": 24, **extra})
    if response.status_code == 422 and _structured(mode):  # the model could not write valid JSON on this CPU
        check(response.json(), "ErrorResponse")
        return
    assert response.status_code == 200, response.text
    body = response.json()
    _chat_body(body)
    assert len(body["choices"]) == extra.get("n", 1)
    if mode == "logprobs":
        for entry in body["choices"][0]["logprobs"]["content"]:
            assert len(entry["top_logprobs"]) == 3
    if mode == "tools_forced":
        assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize("mode", CHAT_MODES)
def test_chat_completion_stream(api_server, mode):
    response = post(api_server, "/v1/chat/completions",
                    {"model": "smollm2", "messages": QUESTION, "max_tokens": 24, "stream": True, **CHAT_MODES[mode]})
    if _structured(mode):
        events = sse_events(response)
        last = json.loads(events[-2][1])
        if "error" in last:  # the model could not write valid JSON on this CPU: the stream's error event
            check(last, "ErrorResponse")
            for _, data in events[:-2]:
                check(json.loads(data), "CreateChatCompletionStreamResponse")
            return
    found = _chat_chunks(response)
    if mode == "usage":
        assert found[-1]["choices"] == [] and found[-1]["usage"]["total_tokens"] > 0
    finishes = [c["choices"][0]["finish_reason"] for c in found if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishes) == CHAT_MODES[mode].get("n", 1)


# ----------------------------------------------------------------------------- completions
COMPLETION_MODES = {
    "plain": {},
    "list_prompt_n2": {"prompt": ["The sky is", "Grass is"], "n": 2, "temperature": 0.8, "seed": 1},
    "logprobs": {"logprobs": 2},
    "echo": {"echo": True},
    "echo_logprobs": {"echo": True, "logprobs": 3},
    "stop": {"stop": ["."]},
    "usage": {"stream_options": {"include_usage": True}},
}


@pytest.mark.parametrize("mode", COMPLETION_MODES)
def test_completion_body(api_server, mode):
    extra = {k: v for k, v in COMPLETION_MODES[mode].items() if k != "stream_options"}
    body = {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 12, **extra}
    response = post(api_server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    result = response.json()
    check(result, "CreateCompletionResponse")
    assert isinstance(result["system_fingerprint"], str)
    if "logprobs" in extra:
        logprobs = result["choices"][0]["logprobs"]
        assert all(len(alternatives) == extra["logprobs"] for alternatives in logprobs["top_logprobs"] if alternatives)


@pytest.mark.parametrize("mode", COMPLETION_MODES)
def test_completion_stream(api_server, mode):
    body = {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 12, "stream": True,
            **COMPLETION_MODES[mode]}
    found = chunks(post(api_server, "/v1/completions", body))
    for chunk in found:
        # Not CreateCompletionResponse: a chunk's finish_reason is null until the last one (see DERIVED).
        check(chunk, "x-CompletionStreamChunk")
        assert isinstance(chunk["system_fingerprint"], str)
    ends = [c for c in found if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(ends) == len(body["prompt"]) * body.get("n", 1) if isinstance(body["prompt"], list) else 1


# ----------------------------------------------------------------------------- models and errors
def test_models(api_server):
    listing = requests.get(api_server.base + "/v1/models", timeout=30)
    check(listing.json(), "ListModelsResponse")
    model = requests.get(api_server.base + "/v1/models/smollm2", timeout=30)
    check(model.json(), "Model")


@pytest.mark.parametrize("method, path, body, status", [
    ("get", "/v1/models/no-such-model", None, 404),
    ("post", "/v1/chat/completions", {"model": "smollm2", "messages": []}, 400),
    ("post", "/v1/chat/completions", {"model": "smollm2", "messages": QUESTION, "temperature": 7}, 400),
    ("post", "/v1/chat/completions", {"model": "smollm2", "messages": QUESTION, "top_logprobs": 2}, 400),
    ("post", "/v1/completions", {"model": "smollm2", "prompt": "x", "logprobs": 9}, 400),
    ("post", "/v1/completions", {"model": "smollm2", "prompt": "x " * 20000}, 400),
    ("post", "/v1/responses", {"model": "smollm2", "input": "hi", "store": True}, 400),
    ("post", "/v1/responses", {"model": "smollm2", "input": "hi", "top_logprobs": 21}, 400),
])
def test_error_envelopes(api_server, method, path, body, status):
    response = requests.request(method, api_server.base + path, json=body, timeout=60)
    assert response.status_code == status, response.text
    check(response.json(), "ErrorResponse")


# ----------------------------------------------------------------------------- responses
RESPONSE_MODES = {
    "plain": {},
    "instructions": {"instructions": "Answer in one word."},
    "logprobs": {"top_logprobs": 2, "include": ["message.output_text.logprobs"], "temperature": 0},
    "json_schema": {"text": {"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}}},
    "tools_auto": {"tools": [{"type": "function", **WEATHER["function"]}]},
    "tools_forced": {"tools": [{"type": "function", **WEATHER["function"]}], "tool_choice": {"type": "function", "name": "get_weather"}},
}


def _response_logprobs(response: dict) -> list[dict]:
    return [lp for item in response["output"] if item["type"] == "message" for part in item["content"] for lp in part["logprobs"]]


@pytest.mark.parametrize("mode", RESPONSE_MODES)
def test_response_body(api_server, mode):
    response = post(api_server, "/v1/responses",
                    {"model": "smollm2", "input": "What is the capital of France?", "max_output_tokens": 24, **RESPONSE_MODES[mode]})
    if response.status_code == 422 and _structured(mode):
        check(response.json(), "ErrorResponse")
        return
    assert response.status_code == 200, response.text
    body = response.json()
    check(body, "Response")
    assert body["usage"] is not None  # the one deviation (usage: null) is for in-progress responses only
    if mode == "logprobs":
        entries = _response_logprobs(body)
        assert entries and all(len(e["top_logprobs"]) == 2 for e in entries)
        assert all(e["top_logprobs"][0]["token"] == e["token"] for e in entries)  # greedy: the likeliest is chosen
    elif _response_logprobs(body):
        pytest.fail("logprobs given though not asked for")


@pytest.mark.parametrize("mode", RESPONSE_MODES)
def test_response_stream(api_server, mode):
    response = post(api_server, "/v1/responses", {"model": "smollm2", "input": "What is the capital of France?",
                                                 "max_output_tokens": 24, "stream": True, **RESPONSE_MODES[mode]})
    members = stream_event_schemas()
    events = sse_events(response)
    for name, data in events:
        event = json.loads(data)
        assert name == event["type"]
        check(event, members[event["type"]])
    last = json.loads(events[-1][1])
    if last["type"] == "response.failed" and _structured(mode):  # the model could not write valid JSON on this CPU
        return
    assert last["type"] in ("response.completed", "response.incomplete")
    assert last["response"]["usage"] is not None
    deltas = [json.loads(data) for name, data in events if name == "response.output_text.delta"]
    if mode == "logprobs":
        assert all(len(e["top_logprobs"]) == 2 for d in deltas for e in d["logprobs"])
        assert _response_logprobs(last["response"])
    else:
        assert not any(d["logprobs"] for d in deltas)


# ----------------------------------------------------------------------------- system_fingerprint
def _fingerprint(server) -> str:
    wait_idle(server.base)
    response = post(server, "/v1/completions", {"model": "smollm2", "prompt": "Hi", "max_tokens": 1})
    return response.json()["system_fingerprint"]


def test_system_fingerprint_is_stable_across_restarts_and_follows_the_settings(default_model_dir, tmp_path):
    from servers import gunicorn

    prints = []
    for deterministic in ("0", "0", "1"):
        env = {"LLM_MODEL_PATH": default_model_dir, "LLM_MODEL_ID": "smollm2", "LLM_EAGER_LOAD": "1",
               "LLM_DETERMINISTIC": deterministic, "WEB_CONCURRENCY": "1"}
        with gunicorn("wsgi:app", env, str(tmp_path / f"{len(prints)}.log"), "/v1/models") as server:
            prints.append(_fingerprint(server))
    assert prints[0] == prints[1] != prints[2]
    assert all(len(p) == len("fp_") + 10 for p in prints)


# ----------------------------------------------------------------------------- echo with prompt logprobs
def test_echo_lists_the_prompts_tokens_with_their_logprobs(api_server):
    prompt = "The capital of France is"
    body = post(api_server, "/v1/completions",
                {"model": "smollm2", "prompt": prompt, "max_tokens": 4, "echo": True, "logprobs": 2}).json()
    check(body, "CreateCompletionResponse")
    choice = body["choices"][0]
    logprobs = choice["logprobs"]
    prompt_tokens = body["usage"]["prompt_tokens"]
    assert "".join(logprobs["tokens"]) == choice["text"] and choice["text"].startswith(prompt)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(lp <= 0 and math.isfinite(lp) for lp in logprobs["token_logprobs"][1:])
    assert all(len(top) == 2 for top in logprobs["top_logprobs"][1:])
    offsets = [sum(len(t) for t in logprobs["tokens"][:i]) for i in range(len(logprobs["tokens"]))]
    assert logprobs["text_offset"] == offsets
    assert len(logprobs["tokens"]) == prompt_tokens + body["usage"]["completion_tokens"]
