"""LLM_RATE_LIMIT shared through Redis (LLM_RATE_LIMIT_STORAGE): one count across gunicorn workers and across
replicas behind nginx, and what happens when Redis cannot be reached (fail open, or fail closed).

A real Debian ``redis-server`` runs on a free loopback port, without persistence. The requests are
``GET /v1/models`` (no model needed) and, once the limit is reached, Anthropic's count_tokens, refused
before it would touch the model.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager

import pytest
import requests
from debian import ensure_debian_packages
from servers import ROOT, free_port, gunicorn, nginx_in_front

# No model is loaded: /v1/models needs only the id, and refused requests never reach a view.
BASE_ENV = {"LLM_MODEL_ID": "m", "LLM_EAGER_LOAD": "0", "LLM_API_KEYS": ",".join(f"key-{i}" for i in range(8)),
            "LLM_RATE_LIMIT": "10/minute",
            # The access log names the worker process that served each request.
            "GUNICORN_CMD_ARGS": "--access-logformat 'served-by=%(p)s %(r)s %(s)s'"}
SERVED_BY = re.compile(r"served-by=<(\d+)> GET /v1/models\?k=(\S+) HTTP/1.1 (\d+)")


@contextmanager
def redis_server(folder):
    """Debian's redis-server on a free loopback port, in ``folder``, no persistence; stopped at the end."""
    ensure_debian_packages(("redis-server", "redis-server"))
    port = free_port()
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                "--dir", str(folder), "--daemonize", "no"], stdout=open(folder / "redis.log", "w"),
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True).stdout.strip() != "PONG":
            assert process.poll() is None and time.monotonic() < deadline, (folder / "redis.log").read_text()
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def redis_uri(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as uri:
        yield uri


def _models(base: str, key: str) -> requests.Response:
    # ?k= names the key in the access log (a fresh connection per request, as separate clients would).
    return requests.get(f"{base}/v1/models?k={key}", headers={"Authorization": f"Bearer {key}"}, timeout=10)


def _count_tokens(base: str, key: str) -> requests.Response:
    return requests.post(f"{base}/v1/messages/count_tokens", headers={"x-api-key": key}, timeout=10,
                         json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})


def _assert_limited_in_both_envelopes(base: str, key: str) -> None:
    openai_refusal = _models(base, key)
    assert openai_refusal.status_code == 429 and int(openai_refusal.headers["Retry-After"]) >= 1
    assert openai_refusal.json()["error"]["type"] == "rate_limit_error"
    assert openai_refusal.json()["error"]["code"] == "rate_limit_exceeded"
    anthropic_refusal = _count_tokens(base, key)
    assert anthropic_refusal.status_code == 429 and int(anthropic_refusal.headers["Retry-After"]) >= 1
    body = anthropic_refusal.json()
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error" and body["request_id"]


def test_limit_holds_across_two_gunicorn_workers(redis_uri, tmp_path):
    env = {**BASE_ENV, "LLM_WORKERS": "2", "LLM_RATE_LIMIT_STORAGE": redis_uri}
    with gunicorn("wsgi:app", env, str(tmp_path / "server.log"), "/healthz") as server:
        # Keys 0-4 are this test's, 6 the nginx test's (one Redis for the module). A burst of 12 at once:
        # both workers take some (retried with a fresh key in the rare case one takes all).
        for key in (f"key-{i}" for i in range(5)):
            with ThreadPoolExecutor(12) as pool:
                statuses = [r.status_code for r in pool.map(_models, [server.base] * 12, [key] * 12)]
            time.sleep(0.5)  # the access log lines are written
            served = [(pid, status) for pid, k, status in SERVED_BY.findall(server.log()) if k == key]
            if len({pid for pid, status in served if status == "200"}) == 2:
                break
        else:
            pytest.fail(f"one worker took every burst:\n{server.log()[-3000:]}")
        assert sorted(statuses) == [200] * 10 + [429] * 2, statuses
        assert len(served) == 12
        _assert_limited_in_both_envelopes(server.base, key)  # requests 13 and 14
        assert _models(server.base, "key-7").status_code == 200  # another key has its own budget


def test_limit_holds_across_two_replicas_behind_nginx(redis_uri, tmp_path):
    ensure_debian_packages(("nginx", "nginx"))
    env = {**BASE_ENV, "LLM_RATE_LIMIT_STORAGE": redis_uri}
    with ExitStack() as stack:
        replicas = [stack.enter_context(gunicorn("wsgi:app", env, str(tmp_path / f"replica{i}.log"), "/healthz")) for i in range(2)]
        base = nginx_in_front(stack, replicas, tmp_path, "/healthz")

        statuses = [_models(base, "key-6").status_code for _ in range(12)]
        assert statuses == [200] * 10 + [429] * 2
        _assert_limited_in_both_envelopes(base, "key-6")
        for replica in replicas:  # nginx alternates: each replica admitted some of the 10, none admitted 10
            admitted = [s for _, k, s in SERVED_BY.findall(replica.log()) if k == "key-6" and s == "200"]
            assert 0 < len(admitted) < 10, replica.log()[-2000:]


def _closed_port_uri() -> str:
    return f"redis://127.0.0.1:{free_port()}"  # nothing listens there: connections are refused


def _unchecked(base: str, action: str) -> float:
    text = requests.get(base + "/metrics", timeout=10).text
    found = re.search(rf'^llm_rate_limit_unchecked_total\{{action="{action}"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_unreachable_storage_fails_open_counted_and_logged_once(tmp_path):
    env = {**BASE_ENV, "LLM_RATE_LIMIT_STORAGE": _closed_port_uri()}
    with gunicorn("wsgi:app", env, str(tmp_path / "server.log"), "/healthz") as server:
        started = time.monotonic()
        statuses = [_models(server.base, "key-6").status_code for _ in range(14)]
        elapsed = time.monotonic() - started
        assert statuses == [200] * 14  # beyond the limit: nothing counts them
        assert elapsed < 3, elapsed  # a refused connection costs milliseconds
        assert _unchecked(server.base, "admitted") == 14
        failures = [line for line in server.log().splitlines() if "rate limit storage" in line]
        assert len(failures) == 1 and "failed" in failures[0] and "ConnectionError" in failures[0], failures


def test_unreachable_storage_fails_closed_when_asked(tmp_path):
    env = {**BASE_ENV, "LLM_RATE_LIMIT_STORAGE": _closed_port_uri(), "LLM_RATE_LIMIT_FAIL_OPEN": "false"}
    with gunicorn("wsgi:app", env, str(tmp_path / "server.log"), "/healthz") as server:
        openai_refusal = _models(server.base, "key-6")
        assert openai_refusal.status_code == 503 and openai_refusal.headers["Retry-After"] == "1"
        assert openai_refusal.json()["error"]["type"] == "service_unavailable"
        assert openai_refusal.json()["error"]["code"] == "rate_limit_unavailable"
        anthropic_refusal = _count_tokens(server.base, "key-6")
        assert anthropic_refusal.status_code == 529 and anthropic_refusal.headers["Retry-After"] == "1"
        assert anthropic_refusal.json()["error"]["type"] == "overloaded_error"
        assert _unchecked(server.base, "refused") == 2
        assert requests.get(server.base + "/healthz", timeout=10).status_code == 200  # operational routes are not limited


def test_storage_failure_and_recovery_are_logged_once_each(tmp_path, caplog):
    from llm_blueprint import metrics
    from llm_blueprint.errors import RateLimited
    from llm_blueprint.rate_limit import RateLimit

    port = free_port()
    limit = RateLimit("10/minute", f"redis://:secret@127.0.0.1:{port}")
    before = metrics.RATE_LIMIT_UNCHECKED.labels("admitted")._value.get()
    with caplog.at_level("WARNING", logger="llm_blueprint"):
        for _ in range(5):
            limit.check("key")  # served unchecked
        assert metrics.RATE_LIMIT_UNCHECKED.labels("admitted")._value.get() - before == 5
        process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
                                   stdout=subprocess.DEVNULL)
        try:
            time.sleep(1.2)  # redis is up, and the pause after a failure is over
            for _ in range(10):
                limit.check("key")
            with pytest.raises(RateLimited, match="Rate limit of 10/minute"):
                limit.check("key")
        finally:
            process.terminate()
            process.wait(10)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "failed" in lines[0] and "answers again" in lines[1], lines
    assert "secret" not in " ".join(lines) and f"redis://127.0.0.1:{port}" in lines[0]


PROBE = """
from gevent import monkey; monkey.patch_all()
import socket, time, gevent
from llm_blueprint.rate_limit import RateLimit
silent = socket.socket(); silent.bind(("127.0.0.1", 0)); silent.listen(8)  # accepts (backlog), never answers
ticks = []
gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in iter(int, 1)])
limit = RateLimit("10/minute", "redis://127.0.0.1:%d" % silent.getsockname()[1])
started = time.monotonic()
limit.check("key")  # times out: served unchecked
print(round(time.monotonic() - started, 3), len(ticks))
"""


def test_a_silent_storage_times_out_quickly_without_blocking_the_gevent_hub():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    elapsed, ticks = out.stdout.split()
    assert float(elapsed) < 1.0  # the default socket timeout (0.25 s), no retries
    assert int(ticks) >= 10  # another greenlet ran all along


def test_a_wrong_storage_uri_stops_the_app_at_start():
    from flask import Flask
    from limits.errors import ConfigurationError

    from llm_blueprint import LLM

    with pytest.raises(ConfigurationError, match="unknown storage scheme"):
        LLM(Flask("wrong"), LLM_RATE_LIMIT="10/minute", LLM_RATE_LIMIT_STORAGE="redis-typo://127.0.0.1:6379")
