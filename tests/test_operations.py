"""Auth, limits, request ids, CORS, health, metrics, logs: against gunicorn -k gevent and the Flask test client."""

from __future__ import annotations

import json
import logging

import anthropic
import openai
import pytest
import requests
from flask import Flask

from llm_blueprint import LLM

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
KEYS = ["key-one", "key-two"]


@pytest.fixture(scope="module")
def secured_server(default_model_dir, tmp_path_factory):
    from servers import gunicorn

    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text("# accepted keys\nkey-two\n")
    env = {"LLM_MODEL_PATH": default_model_dir, "LLM_MODEL_ID": "smollm2", "LLM_EAGER_LOAD": "1", "LLM_API_KEYS": "key-one",
           "LLM_API_KEYS_FILE": str(keys_file), "LLM_MAX_BODY_BYTES": "20000", "LLM_MAX_MESSAGES": "3",
           "LLM_MAX_TOKENS_LIMIT": "64", "LLM_METRICS_TOKEN": "scrape-me", "LLM_CORS_ORIGINS": "https://chat.example",
           "LLM_LOG_JSON": "1", "LLM_WORKERS": "2"}
    with gunicorn("wsgi:app", env, str(tmp_path_factory.mktemp("sec") / "server.log"), "/healthz") as server:
        yield server


def _openai(server, key):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=key, max_retries=0)


def _anthropic(server, key):
    return anthropic.Anthropic(base_url=server.base, api_key=key, max_retries=0)


def test_keys_from_config_and_file_are_accepted_with_either_header(secured_server):
    for key in KEYS:
        assert _openai(secured_server, key).chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=2).choices
        assert _anthropic(secured_server, key).messages.create(model="smollm2", max_tokens=2, messages=FRANCE).content is not None
    for headers in ({"Authorization": "Bearer key-one"}, {"x-api-key": "key-two"}):
        response = requests.post(secured_server.base + "/v1/messages", headers=headers, timeout=60,
                                 json={"model": "smollm2", "max_tokens": 2, "messages": FRANCE})
        assert response.status_code == 200


def test_wrong_or_missing_key_is_401_in_each_envelope(secured_server):
    with pytest.raises(openai.AuthenticationError) as info:
        _openai(secured_server, "wrong").chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=2)
    assert info.value.code == "invalid_api_key"
    with pytest.raises(anthropic.AuthenticationError) as info:
        _anthropic(secured_server, "wrong").messages.create(model="smollm2", max_tokens=2, messages=FRANCE)
    assert info.value.body["error"]["type"] == "authentication_error" and info.value.body["request_id"]
    bare = requests.post(secured_server.base + "/v1/chat/completions", json={"model": "smollm2", "messages": FRANCE}, timeout=10)
    assert bare.status_code == 401 and bare.json()["error"]["type"] == "authentication_error"
    assert requests.get(secured_server.base + "/v1/models", timeout=10).status_code == 401


def test_limits_give_clear_errors_on_both_protocols(secured_server):
    oai, ant = _openai(secured_server, "key-one"), _anthropic(secured_server, "key-one")
    too_many = [{"role": "user", "content": "hi"}] * 4
    with pytest.raises(openai.BadRequestError, match="at most 3 messages"):
        oai.chat.completions.create(model="smollm2", messages=too_many, max_tokens=2)
    with pytest.raises(anthropic.BadRequestError, match="at most 3 messages"):
        ant.messages.create(model="smollm2", max_tokens=2, messages=too_many)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        oai.chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=65)
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        ant.messages.create(model="smollm2", max_tokens=65, messages=FRANCE)
    with pytest.raises(anthropic.BadRequestError, match="stop"):
        ant.messages.create(model="smollm2", max_tokens=2, messages=FRANCE, stop_sequences=["x" * 300])
    big = [{"role": "user", "content": "x" * 30000}]
    with pytest.raises(openai.APIStatusError) as info:
        oai.chat.completions.create(model="smollm2", messages=big, max_tokens=2)
    assert info.value.status_code == 413
    with pytest.raises(anthropic.APIStatusError) as info:
        ant.messages.create(model="smollm2", max_tokens=2, messages=big)
    assert info.value.status_code == 413 and info.value.body["error"]["type"] == "request_too_large"


def test_request_ids_are_honoured_or_generated(secured_server):
    headers = {"Authorization": "Bearer key-one", "X-Request-Id": "trace-abc-123"}
    response = requests.post(secured_server.base + "/v1/messages", headers=headers, timeout=30,
                             json={"model": "smollm2", "messages": FRANCE})
    assert response.status_code == 400
    assert response.headers["X-Request-Id"] == "trace-abc-123" == response.json()["request_id"]
    generated = requests.get(secured_server.base + "/healthz", timeout=10).headers["X-Request-Id"]
    assert generated.startswith("req_")
    hostile = requests.get(secured_server.base + "/healthz", headers={"X-Request-Id": "bad id\u00e9"}, timeout=10)
    assert hostile.headers["X-Request-Id"].startswith("req_")


def test_health_readiness_and_metrics(secured_server):
    assert requests.get(secured_server.base + "/healthz", timeout=10).json() == {"status": "ok"}
    ready = requests.get(secured_server.base + "/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert requests.get(secured_server.base + "/metrics", timeout=10).status_code == 401
    _openai(secured_server, "key-one").chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=3)
    text = requests.get(secured_server.base + "/metrics", headers={"Authorization": "Bearer scrape-me"}, timeout=10).text
    for name in ("llm_requests_total", "llm_tokens_total", "llm_time_to_first_token_seconds", "llm_request_duration_seconds",
                 "llm_queue_depth", "llm_in_flight_requests", "llm_batch_size", "llm_rejections_total"):
        assert name in text
    assert 'llm_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'llm_requests_total{route="/v1/chat/completions",status="401"}' in text


def _metric(server, name: str) -> float:
    text = requests.get(server.base + "/metrics", headers={"Authorization": "Bearer scrape-me"}, timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith((name + " ", name + "{")))


def test_choices_of_one_prompt_prefill_it_once(secured_server):
    """n choices run as one batch of the same prompt: all of it but its last two tokens is prefilled once (counted).
    Two, not one: CTranslate2 prefills nothing when a row's rest is a single token (engine/ct2_batch.py)."""
    before = _metric(secured_server, "llm_prompt_shared_head_tokens_total")
    reply = _openai(secured_server, "key-one").chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=3,
                                                                       n=3, temperature=0.8)
    assert len(reply.choices) == 3
    saved = _metric(secured_server, "llm_prompt_shared_head_tokens_total") - before
    assert saved == 2 * (reply.usage.prompt_tokens - 2)


def test_cors_only_for_configured_origins(secured_server):
    preflight = requests.options(secured_server.base + "/v1/chat/completions", timeout=10, headers={
        "Origin": "https://chat.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.headers.get("Access-Control-Allow-Origin") == "https://chat.example"
    other = requests.options(secured_server.base + "/v1/chat/completions", timeout=10, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_json_logs_carry_request_ids_and_no_prompts(secured_server):
    secret = "my-secret-prompt-text"
    headers = {"Authorization": "Bearer key-one", "X-Request-Id": "log-check-1"}
    requests.post(secured_server.base + "/v1/chat/completions", headers=headers, timeout=60,
                  json={"model": "smollm2", "messages": [{"role": "user", "content": secret}], "max_tokens": 2})
    lines = [json.loads(line) for line in secured_server.log().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("request_id") == "log-check-1"]
    assert mine and mine[-1]["route"] == "/v1/chat/completions" and mine[-1]["status"] == 200
    assert secret not in secured_server.log()
    assert any("NO API KEYS" in line.get("message", "") for line in lines) is False


def test_open_api_warns_loudly(default_model_dir, caplog):
    app = Flask("open")
    with caplog.at_level(logging.WARNING, logger="llm_blueprint"):
        LLM(app, LLM_MODEL_PATH=default_model_dir)
    assert any("NO API KEYS CONFIGURED" in r.getMessage() for r in caplog.records)


def test_host_app_auth_hook(default_model_dir):
    app = Flask("hooked")
    app.secret_key = "x"
    LLM(app, LLM_MODEL_PATH=default_model_dir, LLM_MODEL_ID="m", LLM_AUTH_HOOK=lambda req: req.cookies.get("session") == "ok")
    client = app.test_client()
    assert client.get("/v1/models").status_code == 401
    client.set_cookie("session", "ok")
    assert client.get("/v1/models").status_code == 200


def test_sigterm_drains_streams_and_exits_cleanly(default_model_dir, tmp_path):
    import signal
    import threading
    import time

    from servers import gunicorn

    env = {"LLM_MODEL_PATH": default_model_dir, "LLM_MODEL_ID": "smollm2", "LLM_EAGER_LOAD": "1", "LLM_GRACEFUL_TIMEOUT": "8"}
    with gunicorn("wsgi:app", env, str(tmp_path / "drain.log"), "/readyz") as server:
        story = {"model": "smollm2", "messages": [{"role": "user", "content": "Write a long story."}], "stream": True,
                 "temperature": 0, "stop": ["@@@"]}
        short = requests.post(server.base + "/v1/chat/completions", json={**story, "max_tokens": 40}, stream=True, timeout=60)
        long = requests.post(server.base + "/v1/chat/completions", json={**story, "max_tokens": 2000, "min_tokens": 2000, "temperature": 0.3},
                             stream=True, timeout=60)
        short_lines, long_lines = short.iter_lines(decode_unicode=True), long.iter_lines(decode_unicode=True)
        for lines in (short_lines, long_lines):
            next(line for line in lines if '"content":"' in line and '"content":""' not in line)
        collected = {}
        readers = [threading.Thread(target=lambda n=n, ls=ls: collected.__setitem__(n, [line for line in ls if line]))
                   for n, ls in (("short", short_lines), ("long", long_lines))]
        for reader in readers:
            reader.start()
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10  # the master forwards the signal to the worker: wait until it drains
        while time.monotonic() < deadline:
            try:
                if requests.get(server.base + "/readyz", timeout=2).json()["status"] == "draining":
                    break
            except requests.ConnectionError:
                break
            time.sleep(0.05)
        try:  # a new request is refused: 503 from the draining worker, or no listener any more
            late = requests.post(server.base + "/v1/chat/completions", timeout=5,
                                 json={"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert late.status_code == 503
        except requests.ConnectionError:
            pass
        for reader in readers:
            reader.join(30)
        for name in ("short", "long"):
            lines = collected[name]
            assert lines[-1] == "data: [DONE]", (name, lines[-3:])
            finishes = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in lines
                        if line.startswith("data: {") and '"finish_reason":"' in line]
            assert finishes, name
        assert server.process.wait(30) == 0
    assert "terminate called" not in server.log()


def test_sigterm_while_a_warm_up_computes_ends_the_worker_without_a_crash(gemma3_gguf, cache_dir, tmp_path):
    """After an answer, an idle replica holds the conversation for its next turn (a warm-up: one CTranslate2 call
    that cannot be interrupted). A SIGTERM right then ended the worker with SIGSEGV one time in two (Gemma 3, a
    9,000-token conversation; first seen with Claude Code): the interpreter exited, running the native libraries'
    exit handlers, under the running call. The worker now waits for the call up to its shutdown timeout, then ends
    at once without them."""
    import signal

    from chat_templates import GEMMA_TEMPLATE
    from servers import gunicorn

    template = tmp_path / "gemma.jinja"
    template.write_text(GEMMA_TEMPLATE)
    env = {"LLM_MODEL_PATH": gemma3_gguf, "LLM_CACHE_DIR": cache_dir, "LLM_MODEL_ID": "gemma", "LLM_EAGER_LOAD": "1",
           "LLM_CHAT_TEMPLATE": str(template), "LLM_INTER_THREADS": "2", "LLM_INTRA_THREADS": "1",
           "LLM_DEFAULT_EMBEDDINGS": "0"}
    words = " ".join(f"item{i % 113}" for i in range(2200))  # about 6,600 tokens: a warm-up of over 10 s here
    log = tmp_path / "warm.log"
    with gunicorn("wsgi:app", env, str(log), "/readyz", check_exit=False) as server:
        answer = requests.post(server.base + "/v1/chat/completions", timeout=300, json={
            "model": "gemma", "messages": [{"role": "system", "content": words}, {"role": "user", "content": "Hi."}],
            "max_tokens": 1, "temperature": 0})
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["prompt_tokens"] > 6000
        server.process.send_signal(signal.SIGTERM)  # the warm-up of this conversation has just started
        assert server.process.wait(90) == 0
    text = log.read_text()
    assert "was sent SIG" not in text and "terminate called" not in text, text[-2000:]
    assert "native work was still running at exit (llm-engine-" in text  # the warm-up was running: the case here


def test_per_key_rate_limit_on_both_protocols(default_model_dir):
    app = Flask("limited")
    LLM(app, LLM_MODEL_PATH=default_model_dir, LLM_MODEL_ID="m", LLM_API_KEYS="a,b", LLM_RATE_LIMIT="3/minute")
    client = app.test_client()
    for _ in range(3):
        assert client.get("/v1/models", headers={"Authorization": "Bearer a"}).status_code == 200
    limited = client.get("/v1/models", headers={"Authorization": "Bearer a"})
    assert limited.status_code == 429 and limited.json["error"]["type"] == "rate_limit_error"
    assert int(limited.headers["Retry-After"]) >= 1
    anthropic_limited = client.post("/v1/messages/count_tokens", headers={"x-api-key": "a"}, json={"model": "m", "messages": FRANCE})
    assert anthropic_limited.status_code == 429 and anthropic_limited.json["error"]["type"] == "rate_limit_error"
    assert client.get("/v1/models", headers={"x-api-key": "b"}).status_code == 200  # another key has its own budget


def test_n_ceiling_and_prompt_logging_switch(default_model_dir, caplog):
    app = Flask("logged")
    LLM(app, LLM_MODEL_PATH=default_model_dir, LLM_MODEL_ID="m", LLM_MAX_N=2, LLM_LOG_PROMPTS=True)
    client = app.test_client()
    with caplog.at_level(logging.INFO, logger="llm_blueprint"):
        too_many = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "secret-xyz"}], "n": 3})
    assert too_many.status_code == 400 and too_many.json["error"]["param"] == "n"
    assert any("secret-xyz" in str(getattr(r, "body", "")) for r in caplog.records)  # logged only because it was enabled
    # plain logs carry the body in the message, whole: an agent's 76 KB request is not cut
    long_text = "long-" * 20000
    with caplog.at_level(logging.INFO, logger="llm_blueprint"):
        client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": long_text + "end-marker"}],
                                                  "n": 3})
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request body (")]
    assert any(long_text in m and "end-marker" in m for m in logged)
