"""A dead engine worker is a fast, clear 503 in each protocol's envelope and a failing /readyz, never a hang.

The worker is killed the way a bug would kill it: the scheduler call it makes outside any batch raises.
"""

from __future__ import annotations

import time

from flask import Flask

from llm_blueprint import LLM

HELLO = [{"role": "user", "content": "Say hello."}]


def test_a_dead_worker_is_a_fast_503_and_readiness_fails(default_model_dir, caplog):
    app = Flask("dying")
    llm = LLM(app, LLM_MODEL_PATH=default_model_dir, LLM_MODEL_ID="m")
    client = app.test_client()
    ok = client.post("/v1/chat/completions", json={"model": "m", "messages": HELLO, "max_tokens": 4})
    assert ok.status_code == 200
    assert client.get("/readyz").status_code == 200
    engine = llm.runtime(app).engine

    def broken(generator):
        raise RuntimeError("scheduler bug")

    engine.scheduler.take_batch = broken
    started = time.monotonic()
    first = client.post("/v1/chat/completions", json={"model": "m", "messages": HELLO, "max_tokens": 4})
    assert time.monotonic() - started < 10  # the waiting request ends with the worker, it does not hang
    assert first.status_code >= 500 and "error" in first.json

    started = time.monotonic()
    after = client.post("/v1/chat/completions", json={"model": "m", "messages": HELLO, "max_tokens": 4})
    assert after.status_code == 503 and after.json["error"]["type"] == "service_unavailable"
    assert "engine stopped" in after.json["error"]["message"] and "RuntimeError: scheduler bug" in after.json["error"]["message"]
    anthropic = client.post("/v1/messages", json={"model": "m", "messages": HELLO, "max_tokens": 4})
    assert anthropic.status_code == 503 and anthropic.json["type"] == "error"
    assert anthropic.json["error"]["type"] == "api_error" and "engine stopped" in anthropic.json["error"]["message"]
    streamed = client.post("/v1/chat/completions", json={"model": "m", "messages": HELLO, "stream": True})
    assert streamed.status_code == 503  # refused before the stream starts
    assert time.monotonic() - started < 2  # fast: nothing waits for the dead engine

    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json["status"] == "engine stopped"
    assert not engine.alive
    deaths = [r for r in caplog.records if "engine worker died" in r.getMessage()]
    assert len(deaths) == 1  # logged once, whatever the number of workers and requests
    engine.shutdown()
