"""Protocol formatters turn a failing generation into each protocol's mid-stream error."""

from __future__ import annotations

import json

from llm_blueprint.api.anthropic import _message_events
from llm_blueprint.api.errors import anthropic_stream_failure, openai_stream_failure
from llm_blueprint.api.openai import _chat_chunks
from llm_blueprint.api.openai_responses import _ResponseFields, _ResponseStream
from llm_blueprint.api.sse import ended_anyway
from llm_blueprint.events import Done, Finish, Heartbeat, TextDelta

FAILING = [TextDelta(0, "Hel"), Heartbeat(), Finish(0, "error", 1, error="CUDA out of memory"), Done(5, 1)]


def test_openai_stream_sends_error_chunk_then_done():
    body = _chat_chunks(iter(FAILING), {"id": "chatcmpl-x", "created": 0, "model": "m"}, 1, None, False)
    chunks = list(ended_anyway(body, openai_stream_failure))
    assert chunks[-1] == "data: [DONE]\n\n"
    assert ": keep-alive\n\n" in chunks
    error = json.loads(chunks[-2][len("data: "):])
    assert "CUDA out of memory" in error["error"]["message"] and error["error"]["type"] == "server_error"


def test_anthropic_stream_sends_error_event():
    events = list(ended_anyway(_message_events(iter(FAILING), {"id": "msg_x", "model": "m"}, 5, None), anthropic_stream_failure))
    assert events[-1].startswith("event: error\n")
    payload = json.loads(events[-1].split("data: ", 1)[1])
    assert payload == {"type": "error", "error": {"type": "api_error", "message": "generation failed: CUDA out of memory"}}
    assert any(e.startswith("event: ping\n") for e in events)
    assert not any("message_stop" in e for e in events)


def _responses_events(items) -> list[dict]:
    stream = _ResponseStream(_ResponseFields({"model": "m"}, 1.0, 1.0))
    chunks = ended_anyway(stream.body(iter(items)), stream.failed)
    return [json.loads(e.split("data: ", 1)[1]) for e in chunks if e.startswith("event:")]


def test_responses_stream_ends_with_failed_on_a_generation_error():
    events = _responses_events(FAILING)
    assert events[-1]["type"] == "response.failed"
    assert "CUDA out of memory" in events[-1]["response"]["error"]["message"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_responses_stream_ends_with_failed_on_a_bug_mid_stream():
    def broken():
        yield TextDelta(0, "Hel")
        raise RuntimeError("a bug")

    events = _responses_events(broken())
    assert events[-1]["type"] == "response.failed" and events[-1]["response"]["error"]["code"] == "server_error"
    assert "a bug" not in json.dumps(events[-1])  # internal details stay in the log
