"""Broken and hostile clients against gunicorn -k gevent: afterwards the worker is healthy and idle."""

from __future__ import annotations

import json
import random
import socket
import threading
import time

import requests

STORY = {"model": "smollm2", "messages": [{"role": "user", "content": "Write a long story."}], "stream": True,
         "max_tokens": 300, "temperature": 0.7, "stop": ["@@@"]}
RSS_GROWTH_BOUND_MB = 100


def _raw_request(port: int, path: str, body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                 + body)
    return sock


def _worker_rss_mb(master_pid: int) -> float:
    import subprocess

    total = 0.0
    for pid in subprocess.run(["pgrep", "-P", str(master_pid)], capture_output=True, text=True).stdout.split():
        with open(f"/proc/{pid}/status") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    return total


def _gauge(base: str, name: str) -> float:
    text = requests.get(base + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{"))


FRANCE_GREEDY = {"model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of France?"}],
                 "max_tokens": 20, "temperature": 0}


def _wait_idle(base: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = requests.get(base + "/readyz", timeout=10).json()
        if not (ready["running"] or ready["queued"] or _gauge(base, "llm_in_flight_requests")):
            return
        time.sleep(0.5)


def test_vanishing_slow_and_malformed_clients_leave_a_healthy_idle_worker(api_server):
    base, port = api_server.base, api_server.port
    rng = random.Random(1234)
    body = json.dumps(STORY).encode()

    def vanish(cut_after: int) -> None:
        sock = _raw_request(port, "/v1/chat/completions" if rng.random() < 0.7 else "/v1/messages",
                            json.dumps({**STORY, "max_tokens": 200}).encode())
        received = 0
        try:
            while received < cut_after:
                chunk = sock.recv(min(512, cut_after - received))
                if not chunk:
                    break
                received += len(chunk)
        finally:
            sock.close()  # gone without a word, at a random point (headers, first chunks, mid-stream)

    def vanishing_round(clients: int) -> list[threading.Thread]:
        threads = [threading.Thread(target=vanish, args=(rng.choice([0, 50, 400, 2000, 8000]),)) for _ in range(clients)]
        for thread in threads:
            thread.start()
            time.sleep(0.02)
        return threads

    # A first round warms the engine's batch buffers (CTranslate2 caches its allocations);
    # growth is measured from there, over the 50-client round and everything after it.
    for thread in vanishing_round(16):
        thread.join(120)
    _wait_idle(base)
    reference = requests.post(base + "/v1/chat/completions", timeout=60, json=FRANCE_GREEDY).json()
    rss_before = _worker_rss_mb(api_server.process.pid)
    vanishers = vanishing_round(50)

    slow = _raw_request(port, "/v1/chat/completions", body)
    for _ in range(5):  # a client reading one byte per second
        assert slow.recv(1)
        time.sleep(1)
    slow.close()

    for thread in vanishers:
        thread.join(120)

    bad_bodies = [b"\xff\xfe\xfd garbage", b"[" * 200000 + b"]" * 200000, b'{"model": "smollm2", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"]
    for bad in bad_bodies:
        response = requests.post(base + "/v1/chat/completions", data=bad, headers={"Content-Type": "application/json"}, timeout=60)
        assert response.status_code == 400
    huge = {"model": "smollm2", "messages": [{"role": "user", "content": "word " * 200_000}], "max_tokens": 5}
    response = requests.post(base + "/v1/chat/completions", json=huge, timeout=120)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    response = requests.post(base + "/v1/messages", json=huge, timeout=120)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"

    _wait_idle(base)
    assert _gauge(base, "llm_in_flight_requests") == 0 and _gauge(base, "llm_queue_depth") == 0
    assert requests.get(base + "/readyz", timeout=10).json()["running"] == 0
    reply = requests.post(base + "/v1/chat/completions", timeout=60, json=FRANCE_GREEDY)
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["message"] == reference["choices"][0]["message"]  # served alone both times: the same answer
    growth = _worker_rss_mb(api_server.process.pid) - rss_before
    print(f"idle worker's RSS grew {growth:.0f} MB")
    assert growth < RSS_GROWTH_BOUND_MB
    assert "Traceback" not in api_server.log()
