"""A legacy app mounting the blueprint keeps behaving as before, under load too."""

from __future__ import annotations

import threading
import time

import openai
import pytest
import requests

from app_example import create_app

KEY = "sk-legacy-test"
AUTH = {"Authorization": f"Bearer {KEY}"}

HOST_REQUESTS = [("GET", "/"), ("GET", "/api/items"), ("GET", "/api/items/1"), ("GET", "/api/items/999"),
                 ("GET", "/nowhere"), ("POST", "/api/items"), ("GET", "/llm")]


def _snapshot(app):
    client = app.test_client()
    return [(r.status_code, r.headers.get("Content-Type"), r.headers.get("X-Legacy-App"), r.get_data())
            for r in (client.open(path, method=method) for method, path in HOST_REQUESTS)]


def test_mounting_changes_nothing_in_the_host_app(default_model_dir):
    before = _snapshot(create_app(mount_llm=False))
    after = _snapshot(create_app({"LLM_MODEL_PATH": default_model_dir}))
    assert before == after
    assert b"\\u20ac" in after[1][3]  # the host's own JSON settings (ensure_ascii) still apply


def test_blueprint_lives_under_the_prefix_with_its_own_errors(default_model_dir):
    app = create_app({"LLM_MODEL_PATH": default_model_dir, "LLM_MODEL_ID": "smollm2", "LLM_API_KEYS": KEY})
    client = app.test_client()
    assert client.get("/v1/models").status_code == 404  # host's 404 page: nothing at the root
    models = client.get("/llm/v1/models", headers=AUTH)
    assert models.status_code == 200 and models.json["data"][0]["id"] == "smollm2"
    bad = client.post("/llm/v1/chat/completions", data="nope", headers=AUTH)
    assert bad.status_code == 400 and bad.json["error"]["type"] == "invalid_request_error"
    assert app.extensions["llm"].settings["LLM_URL_PREFIX"] == "/llm"
    assert set(app.error_handler_spec[None]) == {404}  # the host's own handler, none of ours
    # our request hooks are scoped to the blueprint: the app-wide ones are the host's own
    assert [f.__name__ for f in app.before_request_funcs[None]] == ["start_timer"]
    assert [f.__name__ for f in app.after_request_funcs[None]] == ["stamp"]
    assert "X-Request-Id" not in client.get("/api/items").headers
    assert "X-Request-Id" in client.get("/llm/healthz").headers


def test_init_app_pattern_and_constructor_overrides(default_model_dir):
    from flask import Flask

    from llm_blueprint import LLM

    app = Flask("legacy")
    app.config["LLM_URL_PREFIX"] = "/from-config"
    LLM(LLM_URL_PREFIX="/ai", LLM_MODEL_PATH=default_model_dir).init_app(app)
    rules = {r.rule for r in app.url_map.iter_rules()}
    assert "/ai/v1/chat/completions" in rules and "/from-config/v1/models" not in rules


@pytest.fixture(scope="module")
def legacy_server(default_model_dir, tmp_path_factory):
    from servers import gunicorn

    log = str(tmp_path_factory.mktemp("legacy") / "legacy.log")
    env = {"LLM_MODEL_PATH": default_model_dir, "LLM_MODEL_ID": "smollm2", "LLM_API_KEYS": KEY}
    with gunicorn("app_example.wsgi:app", env, log, "/api/ping") as server:
        yield server


def test_host_route_stays_fast_while_a_long_answer_streams(legacy_server):
    client = openai.OpenAI(base_url=legacy_server.base + "/llm/v1", api_key=KEY, max_retries=0)
    streaming = threading.Event()
    done = threading.Event()

    def stream():
        for _chunk in client.chat.completions.create(model="smollm2", stream=True, temperature=0, max_tokens=300,
                                                    messages=[{"role": "user", "content": "Write a long story."}],
                                                    extra_body={"min_tokens": 300}):
            streaming.set()
        done.set()

    thread = threading.Thread(target=stream)
    thread.start()  # the first request also loads the model (lazily)
    assert streaming.wait(60)
    session = requests.Session()
    latencies = []
    while not done.is_set() and len(latencies) < 40:
        started = time.monotonic()
        assert session.get(legacy_server.base + "/api/ping", timeout=5).json() == {"pong": True}
        latencies.append(time.monotonic() - started)
        time.sleep(0.05)
    thread.join(120)
    assert len(latencies) >= 10, "the stream ended before enough samples"
    # A hub blocked by generation would stall these for seconds (the whole 300-token answer); the bound leaves room
    # for a busy 2-core machine's scheduling noise.
    assert sorted(latencies)[len(latencies) // 2] < 0.05 and max(latencies) < 0.5, latencies


def test_gthread_worker_also_serves(default_model_dir, tmp_path):
    from servers import gunicorn

    env = {"LLM_MODEL_PATH": default_model_dir, "LLM_MODEL_ID": "smollm2"}
    with gunicorn("wsgi:app", env, str(tmp_path / "gthread.log"), "/v1/models", worker_class="gthread") as server:
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        reply = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=20)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smollm2", messages=messages, temperature=0, max_tokens=20, stream=True) if c.choices)
        assert streamed == reply.choices[0].message.content and streamed


def test_login_is_the_auth_hook_for_the_apps_own_pages(default_model_dir):
    app = create_app({"LLM_MODEL_PATH": default_model_dir, "LLM_MODEL_ID": "smollm2", "LLM_API_KEYS": KEY})
    client = app.test_client()
    assert client.get("/chat").status_code == 302  # the page wants a login
    assert client.get("/llm/v1/models").status_code == 401  # no session, no key
    wrong = client.post("/login", data={"username": "demo", "password": "nope"})
    assert wrong.status_code == 401 and b"Wrong user name or password" in wrong.data
    assert client.post("/login?next=/chat", data={"username": "demo", "password": "demo"}).headers["Location"] == "/chat"
    page = client.get("/chat")
    assert page.status_code == 200 and b'data-api="/llm/v1"' in page.data
    with client.session_transaction() as session:
        token = session["csrf"]
    assert client.get("/llm/v1/models").status_code == 401  # the session alone is not enough (CSRF)
    assert client.get("/llm/v1/models", headers={"X-CSRF-Token": "forged"}).status_code == 401
    assert client.get("/llm/v1/models", headers={"X-CSRF-Token": token}).status_code == 200
    assert client.get("/llm/v1/models", headers=AUTH).status_code == 200  # API clients keep using keys
    client.post("/logout")
    assert client.get("/llm/v1/models", headers={"X-CSRF-Token": token}).status_code == 401
