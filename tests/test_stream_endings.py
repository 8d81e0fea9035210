"""Every stream ends with its protocol's final events: nothing in a stream's body needs the request context,
and a failure mid-stream still ends it the protocol's way."""

from __future__ import annotations

import json

import pytest
from flask import Flask

from llm_blueprint import LLM
from llm_blueprint.chat_model import ChatModel
from llm_blueprint.events import TextDelta

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_streamed_chat_with_logprobs_completes(openai_client):
    options = {"model": "smollm2", "messages": FRANCE, "temperature": 0, "max_tokens": 20, "logprobs": True}
    full = openai_client.chat.completions.create(**options)
    chunks = list(openai_client.chat.completions.create(**options, stream=True))
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    streamed = [entry for c in chunks if c.choices and c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    assert streamed and all(entry.logprob <= 0 and entry.bytes == list(entry.token.encode()) for entry in streamed)
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in full.choices[0].logprobs.content]


def test_streamed_completion_with_logprobs_completes(openai_client):
    options = {"model": "smollm2", "prompt": "The capital of France is", "temperature": 0, "max_tokens": 8, "logprobs": 1}
    full = openai_client.completions.create(**options)
    chunks = list(openai_client.completions.create(**options, stream=True))
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    tokens = [token for c in chunks if c.choices and c.choices[0].logprobs for token in c.choices[0].logprobs.tokens]
    offsets = [offset for c in chunks if c.choices and c.choices[0].logprobs for offset in c.choices[0].logprobs.text_offset]
    assert tokens and tokens == full.choices[0].logprobs.tokens
    assert offsets == full.choices[0].logprobs.text_offset


# ----------------------------------------------------------------------------- a failure mid-stream
class FailingStream:
    """An engine event stream that raises right after its first text delta (a bug of ours, a native error)."""

    def __init__(self, stream):
        self.stream = stream
        self.events = self._events()

    def _events(self):
        for event in self.stream:
            yield event
            if isinstance(event, TextDelta):
                raise RuntimeError("injected failure")

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.events)

    def cancel(self):
        self.stream.cancel()

    def close(self):
        self.stream.close()


@pytest.fixture(scope="module")
def app(default_model_dir):
    app = Flask("streams")
    LLM(app, LLM_MODEL_PATH=default_model_dir, LLM_MODEL_ID="m")
    yield app
    app.extensions["llm"].shutdown()


@pytest.fixture()
def failing_client(app, monkeypatch):
    """The app's test client, every generation failing after its first text (ChatModel.generate starts them all)."""
    generate = ChatModel.generate
    monkeypatch.setattr(ChatModel, "generate", lambda self, request: FailingStream(generate(self, request)))
    return app.test_client()


def _sse(response) -> list[tuple[str | None, str]]:
    """(event name, data) of every event of a streamed response, in order."""
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    events = []
    for block in response.get_data(as_text=True).split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if lines:
            name = next((line[7:] for line in lines if line.startswith("event: ")), None)
            events.append((name, next(line[6:] for line in lines if line.startswith("data: "))))
    return events


CHAT = {"model": "m", "messages": FRANCE, "max_tokens": 20, "temperature": 0, "stream": True}


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", CHAT),
    ("/v1/completions", {"model": "m", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "stream": True}),
])
def test_openai_streams_end_with_an_error_chunk_and_done(failing_client, path, body):
    events = _sse(failing_client.post(path, json=body))
    assert events[-1] == (None, "[DONE]")
    error = json.loads(events[-2][1])["error"]
    assert error["type"] == "server_error" and "injected" not in error["message"]  # details stay in the log
    assert any('"text":"' in data or '"content":"' in data for _, data in events[:-2])  # it failed mid-way


def test_anthropic_stream_ends_with_an_error_event(failing_client):
    events = _sse(failing_client.post("/v1/messages", json={**CHAT, "max_tokens": 20}))
    name, data = events[-1]
    assert name == "error" and json.loads(data) == {"type": "error", "error": {
        "type": "api_error", "message": "The server had an error while processing your request."}}
    assert "content_block_delta" in [n for n, _ in events] and "message_stop" not in [n for n, _ in events]


def test_responses_stream_ends_with_response_failed(failing_client):
    events = _sse(failing_client.post("/v1/responses", json={"model": "m", "input": "What is the capital of France?",
                                                             "max_output_tokens": 20, "temperature": 0, "stream": True}))
    name, data = events[-1]
    assert name == "response.failed" and json.loads(data)["response"]["error"]["code"] == "server_error"
    assert "response.output_text.delta" in [n for n, _ in events]
