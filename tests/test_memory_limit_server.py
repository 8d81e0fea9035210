"""LLM_MEMORY_LIMIT_MB through gunicorn, with the official SDKs: the worker admits prompts only up to what its memory
for batches holds (each protocol's own context error beyond it, with the numbers clients parse), runs two prompts
that do not fit together one after the other, reports its budget in /metrics, and its peak resident memory stays
within the limit."""

from __future__ import annotations

import threading

import anthropic
import openai
import pytest
import requests
from servers import gunicorn

from llm_blueprint.engine.memory import MB, WORKSPACE, MemoryShape


@pytest.fixture(scope="module")
def limited(default_model_dir, tmp_path_factory):
    """The server and its limit: 1,000 MB, plus twice what every call holds beyond the workspace on this int8 path
    (the MKL path's embedding copies; MKL's own buffers make its worker larger too), so that both paths leave room
    for prompts of over 500 tokens and under the model's 8,192."""
    limit_mb = 1000 + 2 * (MemoryShape.of(default_model_dir).call_bytes - WORKSPACE) // MB
    env = {"LLM_MODEL_PATH": default_model_dir, "LLM_MODEL_ID": "smollm2", "LLM_EAGER_LOAD": "1",
           "LLM_MEMORY_LIMIT_MB": str(limit_mb), "LLM_INTER_THREADS": "2", "LLM_INTRA_THREADS": "1",
           "LLM_DEFAULT_EMBEDDINGS": "0"}
    with gunicorn("wsgi:app", env, str(tmp_path_factory.mktemp("memory") / "server.log"), "/readyz") as server:
        server.limit_mb = limit_mb
        yield server


def _metrics(server) -> dict[str, float]:
    values = {}
    for line in requests.get(server.base + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def _text(server, tokens: int) -> str:
    """A user message of about ``tokens`` tokens in SmolLM2's chat template."""
    words = max(1, tokens // 3)
    while True:
        text = " ".join(f"item{i % 113}" for i in range(words))
        count = requests.post(server.base + "/tokenize", timeout=30, json={
            "model": "smollm2", "messages": [{"role": "user", "content": text}]}).json()["count"]
        if count >= tokens:
            return text
        words += max(1, (tokens - count) // 3)


def test_prompts_are_admitted_up_to_what_the_memory_holds_and_the_peak_stays_within_the_limit(limited):
    limit = requests.post(limited.base + "/tokenize", timeout=30, json={"model": "smollm2", "prompt": "hi"}).json()[
        "max_model_len"]
    assert 500 < limit < 8192  # the memory, not the model's 8,192 tokens, bounds the context here
    figures = _metrics(limited)
    assert figures["llm_memory_limit_bytes"] == limited.limit_mb * 2**20
    assert 0 < figures['llm_batch_memory_bytes{state="room"}'] < limited.limit_mb * 2**20

    oa = openai.OpenAI(base_url=limited.base + "/v1", api_key="unused", max_retries=0)
    an = anthropic.Anthropic(base_url=limited.base, api_key="unused", max_retries=0)
    too_long = _text(limited, limit + 50)
    with pytest.raises(openai.BadRequestError) as refused:
        oa.chat.completions.create(model="smollm2", max_tokens=8, messages=[{"role": "user", "content": too_long}])
    error = refused.value.body
    assert error["code"] == "context_length_exceeded" and "memory budget" in error["message"], error
    assert f"at most {limit} tokens" in error["message"] and "8192" in error["message"]
    with pytest.raises(anthropic.BadRequestError) as refused:
        an.messages.create(model="smollm2", max_tokens=8, messages=[{"role": "user", "content": too_long}])
    assert refused.value.body["error"]["type"] == "invalid_request_error"
    assert refused.value.body["error"]["message"].startswith("prompt is too long: ")
    assert refused.value.body["error"]["message"].endswith(f" > {limit} maximum")
    # the prompt fits, the completion does not: Anthropic's form with the three numbers (Claude Code lowers
    # max_tokens from them and retries)
    fits = _text(limited, limit // 2)
    with pytest.raises(anthropic.BadRequestError) as refused:
        an.messages.create(model="smollm2", max_tokens=limit, messages=[{"role": "user", "content": fits}])
    message = refused.value.body["error"]["message"]
    assert message.startswith("input length and `max_tokens` exceed context limit: ") and f"> {limit}," in message

    # two prompts of 0.6 x the limit: each fits alone, not both at once; both answer, one after the other
    half = _text(limited, limit * 6 // 10)
    waits_before = _metrics(limited).get("llm_batch_memory_waits", 0)
    answers = []

    def ask() -> None:
        stream = an.messages.create(model="smollm2", max_tokens=16, stream=True,
                                    messages=[{"role": "user", "content": half}])
        answers.append([event.type for event in stream])

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(answers) == 2 and all(a[0] == "message_start" and a[-1] == "message_stop" for a in answers)
    figures = _metrics(limited)
    assert figures["llm_batch_memory_waits"] > waits_before  # the second batch waited for the first's memory
    assert figures["llm_peak_resident_memory_bytes"] <= limited.limit_mb * 2**20
