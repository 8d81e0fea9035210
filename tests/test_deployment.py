"""Production shape: Debian's nginx on loopback in front of two gunicorn (gevent) replicas.

Streams must arrive through nginx as they are generated (not buffered), both
replicas must serve, and stopping a replica gracefully (SIGTERM) must not cut
a stream in progress while new requests go to the other replica.
"""

from __future__ import annotations

import json
import signal
import time
from contextlib import ExitStack

import pytest
import requests
from debian import ensure_debian_packages
from servers import gunicorn, nginx_in_front

CHAT = "/v1/chat/completions"
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


@pytest.fixture(scope="module")
def cluster(default_model_dir, tmp_path_factory):
    ensure_debian_packages(("nginx", "nginx"))
    folder = tmp_path_factory.mktemp("deployment")
    env = {"LLM_MODEL_PATH": default_model_dir, "LLM_MODEL_ID": "smollm2", "LLM_EAGER_LOAD": "1", "LLM_INTER_THREADS": "1",
           "LLM_INTRA_THREADS": "1", "LLM_KEEPALIVE_SECONDS": "0.5", "LLM_GRACEFUL_TIMEOUT": "60"}
    with ExitStack() as stack:
        replicas = [stack.enter_context(gunicorn("wsgi:app", env, str(folder / f"replica{i}.log"), "/readyz")) for i in range(2)]
        base = nginx_in_front(stack, replicas, folder, "/readyz")
        yield base, replicas


def _stream(base: str, max_tokens: int, on_chunk=None) -> tuple[list[tuple[float, dict]], float]:
    """A streamed chat completion through nginx: (arrival time, parsed chunk) of each data line, and the start time."""
    body = {"model": "smollm2", "messages": STORY, "stream": True, "temperature": 0, "max_tokens": max_tokens,
            "min_tokens": max_tokens, "stream_options": {"include_usage": True}}
    started = time.monotonic()
    response = requests.post(base + CHAT, json=body, stream=True, timeout=120)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    chunks, buffer = [], ""
    for data in response.iter_content(chunk_size=None, decode_unicode=True):
        buffer += data
        while "\n\n" in buffer:
            frame, buffer = buffer.split("\n\n", 1)
            if frame.startswith("data: ") and frame != "data: [DONE]":
                chunks.append((time.monotonic(), json.loads(frame[6:])))
                if on_chunk:
                    on_chunk(len(chunks))
            elif frame == "data: [DONE]":
                chunks.append((time.monotonic(), {"done": True}))
    return chunks, started


def test_streams_arrive_incrementally_through_nginx(cluster):
    base, _ = cluster
    chunks, started = _stream(base, 80)
    content = [t for t, c in chunks if c.get("choices") and c["choices"][0]["delta"].get("content")]
    assert len(content) >= 40 and chunks[-1][1] == {"done": True}
    duration = content[-1] - started
    # Unbuffered: the first tokens reach the client early, and arrivals are spread over the whole generation.
    assert content[0] - started < 0.25 * duration, (content[0] - started, duration)
    assert len({round(t - started, 2) for t in content}) > 20


def test_both_replicas_serve(cluster):
    base, replicas = cluster
    for _ in range(6):
        response = requests.post(base + CHAT, json={"model": "smollm2", "messages": STORY, "max_tokens": 2}, timeout=60)
        assert response.status_code == 200
    for replica in replicas:
        assert replica.log().count(f"POST {CHAT}") >= 2, replica.log()[-2000:]


def test_graceful_stop_does_not_cut_a_stream(cluster):
    base, replicas = cluster
    state = {}

    def on_chunk(count):
        if count == 10 and "stopped" not in state:  # mid-stream: stop the replica that serves it
            serving = [r for r in replicas if requests.get(r.base + "/readyz", timeout=5).json().get("running")]
            assert len(serving) == 1
            state["stopped"] = serving[0]
            serving[0].process.send_signal(signal.SIGTERM)
            # New requests keep being served, by the other replica.
            for _ in range(3):
                response = requests.post(base + CHAT, json={"model": "smollm2", "messages": STORY, "max_tokens": 2}, timeout=60)
                state.setdefault("during", []).append(response.status_code)

    chunks, _ = _stream(base, 200, on_chunk)
    stopped = state["stopped"]
    assert state["during"] == [200, 200, 200]
    finish = [c["choices"][0]["finish_reason"] for _, c in chunks if c.get("choices") and c["choices"][0]["finish_reason"]]
    usage = [c["usage"] for _, c in chunks if c.get("usage")]
    assert finish == ["length"] and usage[0]["completion_tokens"] == 200 and chunks[-1][1] == {"done": True}
    assert stopped.process.wait(60) == 0  # and then the replica exits cleanly
    assert "draining" in stopped.log()
