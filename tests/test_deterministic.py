"""LLM_DETERMINISTIC: a greedy request returns the same tokens whatever else the server is doing.

int8 numerics change with batch composition (mixed prompt lengths prefill
differently; a restarted entry re-prefills what it generated), so without the
mode a greedy answer can depend on the traffic it shared a batch with. With
it, only equal prompt lengths share a batch and no batch restarts.
"""

from __future__ import annotations

import threading

import openai
import pytest
import requests

from llm_blueprint.engine import Model, ModelOptions
from llm_blueprint.engine.generation import BatchingOptions, Engine
from llm_blueprint.events import GenerationRequest, TextDelta, collect

PROBE = [{"role": "user", "content": "What is the capital of France?"}]
SAME_LENGTH = [{"role": "user", "content": "What is the capital of Spain?"}]


@pytest.fixture(scope="module")
def model(default_model_dir):
    model = Model(default_model_dir, ModelOptions(device="cpu", inter_threads=1, intra_threads=2))
    yield model
    model.close()


def _chat_ids(model, text):
    return model.encode_chat([{"role": "user", "content": text}])


def test_mode_turns_off_restarts_and_length_mixing():
    options = BatchingOptions(deterministic=True, length_tolerance=0.5, join_tokens=32)
    assert options.length_tolerance == 0 and options.join_tokens == 0


def _late_arrival_batches(model, deterministic: bool) -> list[int]:
    """A compatible request arrives while the only replica runs a young batch of one."""
    engine = Engine(model, batching=BatchingOptions(gather_seconds=0, deterministic=deterministic))
    try:
        short, same = _chat_ids(model, "Tell me about a cat."), _chat_ids(model, "Tell me about a dog.")
        first = engine.generate(GenerationRequest(short, 40, min_tokens=40, temperature=0))
        next(e for e in first if isinstance(e, TextDelta))
        late = engine.generate(GenerationRequest(same, 40, min_tokens=40, temperature=0))
        collect(first, 1)
        collect(late, 1)
        return engine.batch_sizes
    finally:
        engine.shutdown()


def test_deterministic_engine_never_mixes_lengths_nor_restarts(model):
    engine = Engine(model, batching=BatchingOptions(gather_seconds=0.05, deterministic=True))
    try:
        short, longer = _chat_ids(model, "Tell me about a cat."), _chat_ids(model, "Tell me about a big cat.")
        assert len(longer) == len(short) + 1  # within the default 25 % tolerance: batched together without the mode
        same = _chat_ids(model, "Tell me about a dog.")
        assert len(same) == len(short)
        streams = [engine.generate(GenerationRequest(p, 4, temperature=0)) for p in (short, longer, same)]
        for stream in streams:
            collect(stream, 1)
        assert sorted(engine.batch_sizes) == [1, 2]  # equal lengths together, the longer one alone
    finally:
        engine.shutdown()
    assert _late_arrival_batches(model, deterministic=False) == [1, 2]  # without the mode the young batch restarts
    assert _late_arrival_batches(model, deterministic=True) == [1, 1]  # with it, the newcomer waits


@pytest.fixture(scope="module")
def deterministic_server(default_model_dir, tmp_path_factory):
    from servers import gunicorn

    env = {"LLM_MODEL_PATH": default_model_dir, "LLM_MODEL_ID": "smollm2", "LLM_EAGER_LOAD": "1",
           "LLM_DETERMINISTIC": "1", "LLM_MAX_QUEUE": "64",
           "LLM_INTER_THREADS": "1"}  # one replica: every arrival meets a running batch
    with gunicorn("wsgi:app", env, str(tmp_path_factory.mktemp("det") / "det.log"), "/v1/models") as server:
        yield server


def _answer(client, messages):
    reply = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=48)
    return reply.choices[0].message.content, reply.usage.prompt_tokens, reply.usage.completion_tokens


def _load(base, messages, started: threading.Event, results: list, **settings):
    body = {"model": "smollm2", "messages": messages, "stream": True, "max_tokens": 80, **settings}
    with requests.post(base + "/v1/chat/completions", json=body, stream=True, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if b'"content":"' in line and b'"content":""' not in line:
                started.set()
            if line == b"data: [DONE]":
                results.append(True)
    started.set()


def test_greedy_answer_is_the_same_alone_and_under_mixed_load(deterministic_server):
    base = deterministic_server.base
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=300)
    counts = [requests.post(base + "/v1/messages/count_tokens", json={"model": "smollm2", "messages": m}).json()["input_tokens"]
              for m in (PROBE, SAME_LENGTH)]
    assert counts[0] == counts[1]  # one load request can share the probe's batch (equal length)

    alone = _answer(client, PROBE)

    loads = [  # other lengths and settings; the greedy ones (lengths within 25 %) share the probe's batch without the mode
        ({"messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]}, {"temperature": 0}),
        ({"messages": [{"role": "user", "content": "What is the capital of Italy? Explain why."}]}, {"temperature": 0}),
        ({"messages": [{"role": "user", "content": "Name a city."}]}, {"temperature": 0}),
        ({"messages": PROBE}, {"temperature": 0.9, "top_p": 0.9}),
        ({"messages": [{"role": "user", "content": "Describe the sea."}]}, {"temperature": 0}),
        ({"messages": SAME_LENGTH}, {"temperature": 0}),
        ({"messages": [{"role": "user", "content": "What is the capital of Germany and why?"}]}, {"temperature": 0}),
        ({"messages": [{"role": "user", "content": "Tell me a joke about cats."}]}, {"temperature": 0, "stop": ["@@@"]}),
    ]
    results: list = []
    probe: list = []
    threads = []
    for i, (body, settings) in enumerate(loads):
        started = threading.Event()
        thread = threading.Thread(target=_load, args=(base, body["messages"], started, results), kwargs=settings)
        thread.start()
        threads.append(thread)
        if i < 4:
            assert started.wait(120)  # the first four stream before the probe arrives; the rest arrive right after it
        if i == 3:
            probe_thread = threading.Thread(target=lambda: probe.append(_answer(client, PROBE)))
            probe_thread.start()
    probe_thread.join(300)
    for thread in threads:
        thread.join(300)
    assert len(results) == len(loads)  # every load stream ran to its end
    assert probe == [alone]  # same text, same usage


def test_prompt_list_equals_each_prompt_alone(deterministic_server):
    client = openai.OpenAI(base_url=deterministic_server.base + "/v1", api_key="x", max_retries=0, timeout=300)
    prompts = ["Once upon a time", "The sky is"]  # different lengths: mixed in one batch without the mode
    together = client.completions.create(model="smollm2", prompt=prompts, temperature=0, max_tokens=8)
    alone = [client.completions.create(model="smollm2", prompt=p, temperature=0, max_tokens=8).choices[0].text for p in prompts]
    assert [c.text for c in together.choices] == alone
