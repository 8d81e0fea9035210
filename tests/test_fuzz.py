"""schemathesis fuzzes the live gunicorn -k gevent server from its own OpenAPI document.

Every generated request must get a documented status with a body of the documented
shape, and never a 5xx. CI runs a fixed (derandomized) set of examples; set
FUZZ_RANDOM=1 for fresh random examples on each run.
"""

from __future__ import annotations

import json
import os

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance


@pytest.fixture(scope="module")
def fuzz_server(default_model_dir, tmp_path_factory):
    from servers import gunicorn
    from tiny_encoders import TINY_ENCODERS, build

    folders = tmp_path_factory.mktemp("fuzz-encoders")
    for name in ("bert-embed", "xlmr-rerank"):
        build(TINY_ENCODERS[name], str(folders / name))
    models = {"embed": {"path": str(folders / "bert-embed"), "dimensions": True}, "rerank": str(folders / "xlmr-rerank")}
    env = {"LLM_MODEL_PATH": default_model_dir, "LLM_MODEL_ID": "smollm2", "LLM_EAGER_LOAD": "1", "LLM_ACCEPT_ANY_MODEL": "1",
           "LLM_MAX_TOKENS_LIMIT": "8", "LLM_DEFAULT_MAX_TOKENS": "8", "LLM_MAX_N": "2", "LLM_KEEPALIVE_SECONDS": "0.5",
           "LLM_MAX_QUEUE": "256", "LLM_MODELS": json.dumps(models), "LLM_CACHE_DIR": str(folders / "cache"),
           "LLM_EMBEDDING_MAX_INPUTS": "64"}
    with gunicorn("wsgi:app", env, str(tmp_path_factory.mktemp("fuzz") / "fuzz.log"), "/readyz") as server:
        yield server


def test_api_matches_its_openapi_document(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.base + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 14  # the API routes, /tokenize, /detokenize, /v1/embeddings and both rerank paths included
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=not os.environ.get("FUZZ_RANDOM"))
        def fuzz(case):
            # Every check but "schema-valid data is accepted": validation also applies rules no
            # JSON Schema states (context length, max_tokens ceiling, content required unless
            # tool calls...), and those answers are 400s in the documented error shape.
            case.call_and_validate(base_url=fuzz_server.base, timeout=60, excluded_checks=[positive_data_acceptance])

        fuzz()


def test_openapi_document_is_served(fuzz_server):
    document = requests.get(fuzz_server.base + "/openapi.json", timeout=10).json()
    assert document["openapi"].startswith("3.")
    assert {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens",
            "/v1/embeddings", "/v1/rerank", "/rerank"} <= set(document["paths"])


def test_worker_is_healthy_after_fuzzing(fuzz_server):
    assert requests.get(fuzz_server.base + "/readyz", timeout=10).json()["status"] == "ready"
    assert "Traceback" not in fuzz_server.log()
