"""/v1/embeddings, /v1/rerank and /rerank beside the chat model: routing by model id and kind, the OpenAI shape
(float and base64, dimensions, token inputs, usage), limits, metrics, the OpenAPI document; then the official
openai SDK against gunicorn -k gevent with the chat model served in the same worker."""

from __future__ import annotations

import base64
import json
import threading

import numpy as np
import pytest
import requests
from flask import Flask
from openapi_document import check
from tiny_encoders import TINY_ENCODERS, build

from llm_blueprint import LLM
from llm_blueprint.engine.encoder import relevance

QUERY = "What is the capital of France?"
DOCUMENTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
             "Numbers like 12345 appear in text.", "Berlin is the capital of Germany."]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Hugging Face folders of a tiny embedding model and two cross-encoders (converted by the server)."""
    root = tmp_path_factory.mktemp("encoder-folders")
    for name in ("bert-embed", "xlmr-rerank", "bert-rerank"):
        build(TINY_ENCODERS[name], str(root / name))
    return root


def _models(folders) -> dict:
    return {"embed": {"path": str(folders / "bert-embed"), "dimensions": [16, 32]},
            "rerank-xlmr": str(folders / "xlmr-rerank"),  # kind read from the folder
            "rerank-bert": {"path": str(folders / "bert-rerank"), "kind": "rerank"}}


@pytest.fixture(scope="module")
def app(default_model_dir, folders, tmp_path_factory):
    app = Flask(__name__)
    LLM(app, LLM_MODEL_PATH=default_model_dir, LLM_MODEL_ID="m", LLM_MODELS=_models(folders),
        LLM_CACHE_DIR=str(tmp_path_factory.mktemp("cache")), LLM_EMBEDDING_MAX_INPUTS=8)
    yield app
    app.extensions["llm"].shutdown()


@pytest.fixture()
def client(app):
    return app.test_client()


def test_models_lists_every_model(client):
    ids = [m["id"] for m in client.get("/v1/models").get_json()["data"]]
    assert ids == ["m", "embed", "rerank-xlmr", "rerank-bert"]
    assert client.get("/v1/models/rerank-bert").get_json()["id"] == "rerank-bert"
    assert client.get("/v1/models/nope").status_code == 404


def test_embeddings_float_and_base64(client):
    texts = ["Paris is the capital of France.", "tokens"]
    floats = client.post("/v1/embeddings", json={"model": "embed", "input": texts}).get_json()
    check(floats, "CreateEmbeddingResponse")
    assert [d["index"] for d in floats["data"]] == [0, 1] and floats["model"] == "embed"
    vectors = np.array([d["embedding"] for d in floats["data"]])
    assert vectors.shape == (2, 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    assert floats["usage"]["prompt_tokens"] == floats["usage"]["total_tokens"] > 2
    b64 = client.post("/v1/embeddings", json={"model": "embed", "input": texts, "encoding_format": "base64"}).get_json()
    check(b64, "CreateEmbeddingResponse")
    decoded = np.array([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in b64["data"]])
    assert np.array_equal(decoded.astype(np.float32), vectors.astype(np.float32))
    single = client.post("/v1/embeddings", json={"model": "embed", "input": texts[1]}).get_json()
    assert np.allclose(single["data"][0]["embedding"], vectors[1], atol=1e-5)


def test_token_id_inputs_and_dimensions(client, app):
    model = app.extensions["llm"].registry.encoder("embed").model
    ids = model.encode_texts(["Paris is the capital of France."], None, "input")[0].ids
    by_text = client.post("/v1/embeddings", json={"model": "embed", "input": "Paris is the capital of France."}).get_json()
    by_ids = client.post("/v1/embeddings", json={"model": "embed", "input": ids}).get_json()
    nested = client.post("/v1/embeddings", json={"model": "embed", "input": [ids, ids[:3]]}).get_json()
    assert np.allclose(by_text["data"][0]["embedding"], by_ids["data"][0]["embedding"], atol=1e-6)
    assert len(nested["data"]) == 2 and by_ids["usage"]["prompt_tokens"] == len(ids)
    short = client.post("/v1/embeddings", json={"model": "embed", "input": "Paris", "dimensions": 16}).get_json()
    full = client.post("/v1/embeddings", json={"model": "embed", "input": "Paris"}).get_json()["data"][0]["embedding"]
    expected = np.array(full[:16]) / np.linalg.norm(full[:16])
    assert np.allclose(short["data"][0]["embedding"], expected, atol=1e-5)
    refused = client.post("/v1/embeddings", json={"model": "embed", "input": "Paris", "dimensions": 20})
    assert refused.status_code == 400 and refused.get_json()["error"]["param"] == "dimensions"


@pytest.mark.parametrize("body, param, code", [
    ({"model": "embed", "input": []}, "input", None),
    ({"model": "embed", "input": ""}, "input", None),
    ({"model": "embed", "input": [1, "a"]}, "input", None),
    ({"model": "embed", "input": ["x"] * 9}, "input", None),
    ({"model": "embed", "input": ["short", "capital " * 400]}, "input[1]", "context_length_exceeded"),
    ({"model": "embed", "input": [[1, 2, 99999]]}, "input", None),
    ({"model": "embed", "input": "x", "encoding_format": "int8"}, "encoding_format", None),
    ({"model": "m", "input": "x"}, "model", "model_not_supported"),
    ({"model": "rerank-bert", "input": "x"}, "model", "model_not_supported"),
])
def test_embedding_requests_refused_with_400(client, body, param, code):
    response = client.post("/v1/embeddings", json=body)
    assert response.status_code == 400, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] == code


def test_truncation_when_asked(client):
    long_text = "capital " * 400
    body = client.post("/v1/embeddings", json={"model": "embed", "input": long_text, "truncate_prompt_tokens": -1}).get_json()
    assert body["usage"]["prompt_tokens"] == 128
    body = client.post("/v1/embeddings", json={"model": "embed", "input": long_text, "truncate_prompt_tokens": 20}).get_json()
    assert body["usage"]["prompt_tokens"] == 20


def test_routes_refuse_models_of_another_kind_in_their_envelope(client):
    question = [{"role": "user", "content": "hi"}]
    chat = client.post("/v1/chat/completions", json={"model": "embed", "messages": question, "max_tokens": 2})
    assert chat.status_code == 400 and chat.get_json()["error"]["code"] == "model_not_supported"
    assert "embedding model" in chat.get_json()["error"]["message"]
    messages = client.post("/v1/messages", json={"model": "rerank-xlmr", "messages": question, "max_tokens": 2})
    assert messages.status_code == 400 and messages.get_json()["type"] == "error"
    assert messages.get_json()["error"]["type"] == "invalid_request_error"
    unknown = client.post("/v1/embeddings", json={"model": "nope", "input": "x"})
    assert unknown.status_code == 404 and unknown.get_json()["error"]["code"] == "model_not_found"
    assert client.post("/v1/messages", json={"model": "nope", "messages": question, "max_tokens": 2}).status_code == 404
    assert client.post("/rerank", json={"model": "embed", "query": "q", "documents": ["d"]}).status_code == 400
    # the chat model still answers under its id
    ok = client.post("/v1/chat/completions", json={"model": "m", "messages": question, "max_tokens": 2})
    assert ok.status_code == 200


@pytest.mark.parametrize("model", ["rerank-xlmr", "rerank-bert"])
def test_rerank(client, app, model):
    body = client.post("/v1/rerank", json={"model": model, "query": QUERY, "documents": DOCUMENTS}).get_json()
    results = body["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2, 3]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    assert all(r["document"]["text"] == DOCUMENTS[r["index"]] for r in results)
    assert body["usage"]["total_tokens"] > 0 and body["model"] == model
    engine = app.extensions["llm"].registry.encoder(model)
    direct = relevance(engine.logits(engine.model.encode_pairs(QUERY, DOCUMENTS, None)))
    assert np.allclose([direct[r["index"]] for r in results], scores, atol=1e-6)
    top = client.post("/rerank", json={"model": model, "query": QUERY, "documents": [{"text": d} for d in DOCUMENTS],
                                       "top_n": 2, "return_documents": False}).get_json()["results"]
    assert [r["index"] for r in top] == [r["index"] for r in results[:2]] and "document" not in top[0]


def test_rerank_without_model_uses_the_first_rerank_model(client):
    body = client.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS[:2]}).get_json()
    assert body["model"] == "rerank-xlmr"
    assert client.post("/rerank", json={"query": QUERY, "documents": []}).status_code == 400
    assert client.post("/rerank", json={"query": QUERY, "documents": ["x"] * 9}).status_code == 400


def test_metrics_per_model_and_openapi(client):
    client.post("/v1/embeddings", json={"model": "embed", "input": ["a b c", "d"]})
    text = client.get("/metrics").get_data(as_text=True)
    assert 'llm_encoder_inputs_total{kind="embedding",model="embed"}' in text
    assert 'llm_encoder_batch_size_count{model="embed"}' in text
    paths = client.get("/openapi.json").get_json()["paths"]
    assert {"/v1/embeddings", "/v1/rerank", "/rerank"} <= set(paths)


# ----------------------------------------------------------------------------- gunicorn -k gevent, the openai SDK
@pytest.fixture(scope="module")
def live(default_model_dir, folders, tmp_path_factory):
    from servers import gunicorn

    env = {"LLM_MODEL_PATH": default_model_dir, "LLM_MODEL_ID": "smollm2", "LLM_MODELS": json.dumps(_models(folders)),
           "LLM_CACHE_DIR": str(tmp_path_factory.mktemp("live-cache")), "LLM_EAGER_LOAD": "1"}
    with gunicorn("wsgi:app", env, str(tmp_path_factory.mktemp("logs") / "embeddings.log"), "/v1/models") as server:
        yield server


def test_openai_sdk_embeddings_beside_chat_under_gevent(live):
    import openai

    client = openai.OpenAI(base_url=live.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    texts = ["Paris is the capital of France.", "The quick brown fox.", "tokens"]
    default = client.embeddings.create(model="embed", input=texts)  # the SDK asks for base64 and decodes it
    floats = client.embeddings.create(model="embed", input=texts, encoding_format="float")
    assert [len(d.embedding) for d in default.data] == [64, 64, 64]
    assert np.allclose([d.embedding for d in default.data], [d.embedding for d in floats.data], atol=1e-6)
    assert default.usage.prompt_tokens == floats.usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="smollm2", input="x")
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")

    # 16 concurrent embedding requests while a chat completion streams, in the same gevent worker
    results, errors = [], []

    def embed(i: int) -> None:
        try:
            results.append(client.embeddings.create(model="embed", input=[f"text number {i} " * (1 + i % 5)]))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    stream = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Count to ten."}],
                                            max_tokens=32, stream=True)
    threads = [threading.Thread(target=embed, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    chunks = [c for c in stream]
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 16
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
    metrics = requests.get(live.base + "/metrics", timeout=10).text
    assert 'llm_encoder_inputs_total{kind="embedding",model="embed"}' in metrics
    rerank = requests.post(live.base + "/v1/rerank", json={"model": "rerank-bert", "query": QUERY, "documents": DOCUMENTS},
                           timeout=30).json()
    assert len(rerank["results"]) == 4
    assert "Traceback" not in live.log()


def test_a_blueprint_without_embedding_models_says_so(default_model_dir):
    app = Flask("plain")
    LLM(app, LLM_MODEL_PATH=default_model_dir, LLM_MODEL_ID="m", LLM_DEFAULT_EMBEDDINGS=False)  # no all-MiniLM-L6-v2
    client = app.test_client()
    response = client.post("/v1/embeddings", json={"input": "x"})
    assert response.status_code == 404 and "serves no embedding model" in response.get_json()["error"]["message"]
    assert client.post("/v1/embeddings", json={"model": "m", "input": "x"}).status_code == 400
    assert [m["id"] for m in client.get("/v1/models").get_json()["data"]] == ["m"]


def test_models_setting_forms_and_mistakes(folders, default_model_dir, tmp_path):
    from llm_blueprint.settings import resolve

    compact = resolve({}, {"LLM_MODELS": f"a={folders / 'bert-embed'},b={folders / 'xlmr-rerank'}"})["LLM_MODELS"]
    assert compact == {"a": {"path": str(folders / "bert-embed")}, "b": {"path": str(folders / "xlmr-rerank")}}
    as_json = resolve({}, {"LLM_MODELS": json.dumps({"a": {"path": "/x", "kind": "embedding"}})})["LLM_MODELS"]
    assert as_json == {"a": {"path": "/x", "kind": "embedding"}}
    for models, problem in [({"a": {"path": "/x", "kind": "sound"}}, "kind"), ({"a": {"path": "/x", "colour": 1}}, "unknown"),
                            ({"m": {"path": str(folders / "bert-embed")}}, "already the default chat model"),
                            ({"m": {"path": "/elsewhere", "kind": "chat"}}, "already the default chat model"),
                            ({"c": {"path": "/x", "kind": "chat", "pooling": "mean"}}, "unknown")]:
        with pytest.raises(ValueError, match=problem):
            LLM(Flask("bad"), LLM_MODEL_PATH=default_model_dir, LLM_MODEL_ID="m", LLM_MODELS=models)
    # a chat entry names the chat model instead of LLM_MODEL_PATH
    app = Flask("chat-entry")
    LLM(app, LLM_MODELS={"chat": {"path": default_model_dir, "kind": "chat"}, "e": str(folders / "bert-embed")},
        LLM_CACHE_DIR=str(tmp_path))
    assert [m["id"] for m in app.test_client().get("/v1/models").get_json()["data"]] == ["chat", "e"]
    # a chat entry beside LLM_MODEL_PATH is a second chat model (issue #32; tests/test_several_models.py serves them)
    app = Flask("two-chat")
    LLM(app, LLM_MODEL_PATH=default_model_dir, LLM_MODEL_ID="m", LLM_MODELS={"c": {"path": "/elsewhere", "kind": "chat"}},
        LLM_DEFAULT_EMBEDDINGS=False)
    listed = app.test_client().get("/v1/models").get_json()["data"]
    assert [(m["id"], m["kind"], m["status"]) for m in listed] == [("m", "chat", "unloaded"), ("c", "chat", "unloaded")]


def test_an_encoder_is_not_taken_for_the_chat_model(folders):
    with pytest.raises(ValueError, match="not a chat model"):
        LLM(Flask("wrong"), LLM_MODEL_PATH=str(folders / "bert-embed"))
