"""Readiness converges on its own: /readyz turns 200 without any API traffic, eager and lazy, under gunicorn."""

from __future__ import annotations

import time

import requests


def _wait(predicate, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_the_shipped_gunicorn_settings_load_the_model_at_start(default_model_dir, tmp_path):
    from servers import gunicorn

    # No LLM_EAGER_LOAD given: the shipped gunicorn settings make the worker load at start.
    with gunicorn("wsgi:app", {"LLM_MODEL_PATH": default_model_dir}, str(tmp_path / "eager.log"), "/healthz") as server:
        assert _wait(lambda: "ready as" in server.log())  # loaded with no request but /healthz
        ready = requests.get(server.base + "/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_lazy_mode_readiness_probe_starts_the_load(default_model_dir, tmp_path):
    from servers import gunicorn

    env = {"LLM_MODEL_PATH": default_model_dir, "LLM_EAGER_LOAD": "0"}
    with gunicorn("wsgi:app", env, str(tmp_path / "lazy.log"), "/healthz") as server:
        time.sleep(1)
        assert "ready as" not in server.log()  # lazy: nothing loaded yet
        first = requests.get(server.base + "/readyz", timeout=10)
        assert first.status_code == 503 and first.json()["status"] == "loading"  # answered at once, load started
        assert _wait(lambda: requests.get(server.base + "/readyz", timeout=10).status_code == 200)
        assert "ready as" in server.log()


def test_a_failed_load_is_reported_by_readyz(tmp_path):
    from servers import gunicorn

    # A path that exists and looks like a model passes the start's check (a missing one stops the start:
    # tests/test_first_hour.py); its load fails in the background, and /readyz says so.
    broken = tmp_path / "broken-model.gguf"
    broken.write_bytes(b"this is not a GGUF file" * 10)
    env = {"LLM_MODEL_PATH": str(broken), "LLM_EAGER_LOAD": "1", "LLM_CACHE_DIR": str(tmp_path / "cache")}
    with gunicorn("wsgi:app", env, str(tmp_path / "broken.log"), "/healthz") as server:
        assert _wait(lambda: requests.get(server.base + "/readyz", timeout=10).json()["status"] == "load failed")
        body = requests.get(server.base + "/readyz", timeout=10).json()
        assert "broken-model.gguf" in body["error"]
        assert requests.get(server.base + "/healthz", timeout=10).status_code == 200  # the worker stays up
