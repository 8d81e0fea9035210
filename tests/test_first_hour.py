"""Issue #30, what a new user met in the first hour: API paths and methods that do not exist answer in the protocol's
envelope (the host app's own pages stay), the misnamed and unclear messages, a start that can never serve stops at
once, a broken embedding model says so once (503, and in /readyz) instead of converting again on every request, and
the real all-MiniLM-L6-v2 checkpoint from its package converts and embeds like the original."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
from flask import Flask
from tiny_encoders import TinyEncoder, reference_embedding

from llm_blueprint import LLM
from llm_blueprint.engine.default_model import DEFAULT_EMBEDDING_NAME, prepare_default_embedding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- unknown routes, in the envelope
@pytest.mark.parametrize("method, path, status, protocol", [
    ("POST", "/v1/chat/completion", 404, "openai"),
    ("GET", "/v1/chat/completions", 405, "openai"),
    ("DELETE", "/v1/embeddings", 405, "openai"),
    ("GET", "/v1/messages", 405, "anthropic"),
    ("PUT", "/v1/messages/count_tokens", 405, "anthropic"),
    ("POST", "/v1/messages/batches", 404, "anthropic"),
])
def test_unknown_api_routes_answer_in_the_protocols_envelope(api_server, method, path, status, protocol):
    response = requests.request(method, api_server.base + path, json={}, timeout=30)
    assert response.status_code == status
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    if protocol == "openai":
        assert body["error"]["type"] == "invalid_request_error" and path in body["error"]["message"]
    else:
        assert body["type"] == "error" and path in body["error"]["message"]
        assert body["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    if status == 405:
        assert response.headers["Allow"] == "POST"


def test_the_host_apps_own_error_pages_are_untouched(default_model_dir):
    app = Flask("legacy")

    @app.errorhandler(404)
    def legacy_not_found(error):
        return "<p>legacy 404 page</p>", 404

    @app.route("/report")
    def report():
        return "report"

    LLM(app, LLM_MODEL_PATH=default_model_dir, LLM_URL_PREFIX="/llm", LLM_DEFAULT_EMBEDDINGS=False)
    client = app.test_client()
    assert client.get("/nowhere").get_data(as_text=True) == "<p>legacy 404 page</p>"
    assert client.post("/report").status_code == 405 and "<" in client.post("/report").get_data(as_text=True)
    assert client.get("/v1/chat/completions").get_data(as_text=True) == "<p>legacy 404 page</p>"  # outside the prefix
    api = client.post("/llm/v1/chat/completion", json={})
    assert api.status_code == 404 and api.get_json()["error"]["code"] == "unknown_url"


# ----------------------------------------------------------------------------- messages that name the right thing
def test_errors_name_the_parameter_at_fault(openai_client, anthropic_client):
    import anthropic
    import openai

    with pytest.raises(openai.BadRequestError) as missing:
        openai_client.chat.completions.create(model="smollm2", messages=openai.NOT_GIVEN)
    assert missing.value.body["message"] == "Missing required parameter: 'messages'."
    assert missing.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as budget:
        openai_client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=8190)
    assert budget.value.body["param"] == "max_tokens" and budget.value.body["code"] == "context_length_exceeded"
    with pytest.raises(anthropic.BadRequestError) as kind:
        anthropic_client.messages.create(model=DEFAULT_EMBEDDING_NAME, max_tokens=4, messages=[{"role": "user", "content": "x"}])
    assert "is an embedding model; this route needs a chat model" in kind.value.message


def test_an_eager_start_on_a_bad_model_path_stops_and_names_it(tmp_path):
    from servers import free_port

    env = {**os.environ, "LLM_MODEL_PATH": str(tmp_path / "nope"), "LLM_BIND": f"127.0.0.1:{free_port()}",
           "LLM_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "gunicorn", "-c", os.path.join(ROOT, "gunicorn.conf.py"), "--chdir", ROOT,
                           "wsgi:app"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"LLM_MODEL_PATH={tmp_path / 'nope'}: no such file or directory" in done.stdout + done.stderr


# ----------------------------------------------------------------------------- embedding models
@pytest.fixture(scope="module")
def minilm_folder(cache_dir) -> str:
    return prepare_default_embedding(cache_dir)


def test_the_packaged_all_minilm_l6_v2_matches_its_reference_forward(minilm_folder, tmp_path):
    """The real checkpoint (its safetensors carry an I64 ``embeddings.position_ids`` buffer, which used to stop the
    conversion) against an independent float64 numpy forward pass of the same weights."""
    from safetensors.numpy import load_file

    from llm_blueprint.convert import convert_model
    from llm_blueprint.engine.encoder import EncoderEngine, EncoderModel, EncoderOptions

    config = json.load(open(os.path.join(minilm_folder, "config.json")))
    tiny = TinyEncoder("minilm", "bert", pooling="mean", normalize=True, hidden=config["hidden_size"],
                       layers=config["num_hidden_layers"], heads=config["num_attention_heads"], ffn=config["intermediate_size"])
    weights = {k: v for k, v in load_file(os.path.join(minilm_folder, "model.safetensors")).items() if v.dtype.kind == "f"}
    texts = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.", "tokens"]
    for quantization, floor in (("float32", 0.9999), ("int8", 0.99)):
        out = convert_model(minilm_folder, str(tmp_path / quantization), quantization=quantization, show_progress=False)
        engine = EncoderEngine(EncoderModel(out, EncoderOptions(device="cpu", compute_type=quantization, intra_threads=1)),
                               EncoderOptions())
        try:
            inputs = engine.model.encode_texts(texts, None, "input")
            for item, vector in zip(inputs, engine.embed(inputs), strict=True):
                expected = reference_embedding(tiny, weights, item.ids)
                cosine = float(np.dot(vector, expected) / np.linalg.norm(vector) / np.linalg.norm(expected))
                assert cosine >= floor, (quantization, cosine)
        finally:
            engine.shutdown()
            engine.model.close()


def test_the_default_embedding_model_serves_with_no_setting(api_server, openai_client):
    """Installed with ``--no-deps`` by the README's commands: ``/v1/embeddings`` works out of the box."""
    models = {m.id for m in openai_client.models.list().data}
    assert DEFAULT_EMBEDDING_NAME in models
    result = openai_client.embeddings.create(model=DEFAULT_EMBEDDING_NAME, input=["a cat", "a kitten", "a tax form"])
    cat, kitten, tax = (np.asarray(d.embedding) for d in result.data)
    assert len(cat) == 384 and abs(np.linalg.norm(cat) - 1) < 1e-3
    assert cat @ kitten > cat @ tax  # a real model: meaning, not noise


def test_a_broken_embedding_model_fails_once_and_says_so(default_model_dir, tmp_path, caplog):
    broken = tmp_path / "broken-bert"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    app = Flask("broken")
    LLM(app, LLM_MODEL_PATH=default_model_dir, LLM_MODELS={"emb": {"path": str(broken), "kind": "embedding"}},
        LLM_CACHE_DIR=str(tmp_path / "cache"))
    client = app.test_client()
    first = client.post("/v1/embeddings", json={"model": "emb", "input": "x"})
    second = client.post("/v1/embeddings", json={"model": "emb", "input": "x"})
    for response in (first, second):
        assert response.status_code == 503
        error = response.get_json()["error"]
        assert error["type"] == "service_unavailable" and "'emb' could not be loaded" in error["message"]
    assert first.get_json() == second.get_json()
    assert sum("loading the embedding model 'emb' failed" in r.getMessage() for r in caplog.records) == 1
    ready = client.get("/readyz").get_json()  # lazy mode: this starts loading the chat model in the background
    assert ready["models"]["emb"]["status"] == "failed" and ready["models"]["emb"]["error"]
    runtime = app.extensions["llm"]
    deadline = time.monotonic() + 120
    while runtime.loading and time.monotonic() < deadline:
        time.sleep(0.1)
    runtime.shutdown()


def test_a_reinstalled_embedding_package_reuses_the_cache(tmp_path, monkeypatch):
    """The unzipped default embedding model is named by the archive's content, so a reinstall of the package (the
    same file with a new modification time) finds it in the cache instead of leaving another copy (and its
    conversions) beside the old one. Before: a new folder per install."""
    from llm_blueprint.engine import default_model

    archive = default_model.default_embedding_zip()
    copy = tmp_path / os.path.basename(archive)
    shutil.copy(archive, copy)
    monkeypatch.setattr(default_model, "default_embedding_zip", lambda: str(copy))
    first = prepare_default_embedding(str(tmp_path / "cache"))
    os.utime(copy, (1_000_000_000, 1_000_000_000))  # what a reinstall does
    assert prepare_default_embedding(str(tmp_path / "cache")) == first
    assert len([name for name in os.listdir(tmp_path / "cache") if not name.endswith(".lock")]) == 1
