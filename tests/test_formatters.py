"""Protocol formatters turn a failing generation into each protocol's mid-stream error."""

from __future__ import annotations

import json

from llm_blueprint.api.anthropic import _message_events
from llm_blueprint.api.openai import _chat_chunks
from llm_blueprint.engine.generation import Done, Finish, GenerationRequest, Heartbeat, TextDelta

FAILING = [TextDelta(0, "Hel"), Heartbeat(), Finish(0, "error", 1, error="CUDA out of memory"), Done(5, 1)]


def test_openai_stream_sends_error_chunk_then_done():
    chunks = list(_chat_chunks(iter(FAILING), {"id": "chatcmpl-x", "created": 0, "model": "m"}, GenerationRequest([1], 5), False))
    assert chunks[-1] == "data: [DONE]\n\n"
    assert ": keep-alive\n\n" in chunks
    error = json.loads(chunks[-2][len("data: "):])
    assert "CUDA out of memory" in error["error"]["message"] and error["error"]["type"] == "server_error"


def test_anthropic_stream_sends_error_event():
    events = list(_message_events(iter(FAILING), {"id": "msg_x", "model": "m"}, 5))
    assert events[-1].startswith("event: error\n")
    payload = json.loads(events[-1].split("data: ", 1)[1])
    assert payload == {"type": "error", "error": {"type": "api_error", "message": "generation failed: CUDA out of memory"}}
    assert any(e.startswith("event: ping\n") for e in events)
    assert not any("message_stop" in e for e in events)
