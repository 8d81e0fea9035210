"""The scheduler batches concurrent requests, stops entries individually, and bounds its queue."""

from __future__ import annotations

import os
import threading

import anthropic
import openai
import pytest
import requests

from llm_blueprint.engine import Model, ModelOptions
from llm_blueprint.engine.generation import BatchingOptions, Engine
from llm_blueprint.errors import Overloaded
from llm_blueprint.events import Finish, GenerationRequest, TextDelta, collect

STORY = "Write a long story about {}."


@pytest.fixture(scope="module")
def model(default_model_dir):
    return Model(default_model_dir, ModelOptions(device="cpu", inter_threads=1, intra_threads=2))


def _prompt(model, topic):
    return model.encode_chat([{"role": "user", "content": STORY.format(topic)}])


def _run_concurrently(engine, requests_):
    streams = [engine.generate(r) for r in requests_]  # all enqueued before the worker wakes
    return [collect(s, r.n) for s, r in zip(streams, requests_, strict=True)]


def test_concurrent_requests_share_a_batch(model):
    engine = Engine(model, batching=BatchingOptions(gather_seconds=0.05))
    try:
        prompts = [_prompt(model, t) for t in ("a cat", "a dog", "a cow", "a fox")]
        results = _run_concurrently(engine, [GenerationRequest(p, 16, min_tokens=16, temperature=0) for p in prompts])
        assert max(engine.batch_sizes) >= 4
        assert all(r[2].completion_tokens == 16 for r in results)
    finally:
        engine.shutdown()


def test_equal_length_batched_greedy_equals_alone_and_mixed_lengths_are_split(model):
    # no shared head: this is about lengths (the split of a shared head is compared in the test below)
    engine = Engine(model, batching=BatchingOptions(gather_seconds=0.05, length_tolerance=0.0, shared_head_tokens=0))
    try:
        same = [_prompt(model, t) for t in ("a cat", "a dog", "a cow")]
        assert len({len(p) for p in same}) == 1
        alone = [collect(engine.generate(GenerationRequest(p, 24, temperature=0)), 1)[0] for p in same]
        before = len(engine.batch_sizes)
        together = [r[0] for r in _run_concurrently(engine, [GenerationRequest(p, 24, temperature=0) for p in same])]
        assert engine.batch_sizes[before:] == [3]
        # token-identical: equal lengths prefill together exactly as alone (measured on both int8 paths, MKL and oneDNN;
        # LLM_DETERMINISTIC relies on it)
        assert together == alone

        longer = model.encode_chat([{"role": "user", "content": STORY.format("a very old lighthouse keeper and his dog")}])
        before = len(engine.batch_sizes)
        _run_concurrently(engine, [GenerationRequest(same[0], 4, temperature=0), GenerationRequest(longer, 4, temperature=0)])
        assert engine.batch_sizes[before:] == [1, 1]  # tolerance 0: different lengths never share a batch
    finally:
        engine.shutdown()


def test_a_head_the_prompts_of_a_batch_share_is_prefilled_once(smollm2_f32):
    """The template's default system prompt and the user turn's opening ("Write a long story about") are the same
    tokens in every prompt: the batch prefills them once. The model's next-token distributions after the whole
    prompt are those of the unsplit prefill: a head cut at the wrong place, or a state not handed on whole, would
    change them. In float32, where the split changes nothing but summation order (int8 requantizes the activations
    per call, and oneDNN's rounding moves top-5 log-probabilities by up to 0.35 with the split: measured)."""
    model = smollm2_f32
    prompts = [_prompt(model, t) for t in ("a cat", "a dog", "a lighthouse keeper", "two old friends")]
    head = len(os.path.commonprefix(prompts))
    assert head >= 25

    def first_steps(shared_head_tokens):
        engine = Engine(model, batching=BatchingOptions(gather_seconds=0.05, shared_head_tokens=shared_head_tokens))
        try:
            results = _run_concurrently(engine, [GenerationRequest(p, 4, min_tokens=4, temperature=0, logprobs=True,
                                                                   top_logprobs=5) for p in prompts])
            assert engine.batch_sizes == [4]
            assert all(r[2].completion_tokens == 4 for r in results)
            return engine.shared_head_tokens_saved, [dict(r[3][0][0].top) for r in results]
        finally:
            engine.shutdown()

    saved, split = first_steps(8)
    assert saved == 3 * head  # the head is prefilled once instead of four times
    none, whole = first_steps(0)
    assert none == 0
    for a, b in zip(split, whole, strict=True):
        common = a.keys() & b.keys()
        assert len(common) >= 4
        assert max(abs(a[t] - b[t]) for t in common) < 1e-3, (a, b)


def test_incompatible_sampling_is_not_batched_together(model):
    engine = Engine(model, batching=BatchingOptions(gather_seconds=0.05))
    try:
        p = _prompt(model, "a cat")
        before = len(engine.batch_sizes)
        _run_concurrently(engine, [GenerationRequest(p, 4, temperature=0), GenerationRequest(p, 4, temperature=0.7)])
        assert sorted(engine.batch_sizes[before:]) == [1, 1]
    finally:
        engine.shutdown()


def test_n_uses_batch_entries_in_one_call(model):
    engine = Engine(model)
    try:
        texts, finishes, done, _ = collect(engine.generate(GenerationRequest(_prompt(model, "a cat"), 8, min_tokens=8, temperature=0.8, n=3)), 3)
        assert engine.batch_sizes[-1] == 3 and len(finishes) == 3 and done.completion_tokens == 24
    finally:
        engine.shutdown()


def test_a_leaving_client_stops_only_its_entry(model):
    engine = Engine(model, batching=BatchingOptions(gather_seconds=0.05))
    try:
        prompts = [_prompt(model, t) for t in ("a cat", "a dog", "a cow")]
        streams = [engine.generate(GenerationRequest(p, 60, min_tokens=60, temperature=0)) for p in prompts]
        leaver = streams[0]
        for event in leaver:
            if isinstance(event, TextDelta):
                break
        leaver.close()
        others = [collect(s, 1) for s in streams[1:]]
        assert engine.batch_sizes[-1] == 3
        for _texts, finishes, _done, _ in others:
            assert finishes[0].reason in ("length", "stop") and finishes[0].completion_tokens > 5
    finally:
        engine.shutdown()


def test_full_queue_refuses_at_once(model):
    engine = Engine(model, batching=BatchingOptions(max_queue=2, max_batch_size=1, gather_seconds=0))
    try:
        p = _prompt(model, "a cat")
        running = engine.generate(GenerationRequest(p, 200, min_tokens=200, temperature=0))
        next(e for e in running if isinstance(e, TextDelta))  # the only replica is now busy
        waiting = [engine.generate(GenerationRequest(p, 2, min_tokens=2, temperature=0)) for _ in range(2)]
        with pytest.raises(Overloaded) as info:
            engine.generate(GenerationRequest(p, 2, temperature=0))
        assert info.value.retry_after >= 1
        running.close()
        for stream in waiting:  # the queued requests are served once the replica frees up
            events = list(stream)
            assert any(isinstance(e, Finish) and e.reason == "length" for e in events)
        engine.generate(GenerationRequest(p, 1, temperature=0)).close()  # and the queue takes work again
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def tiny_queue_server(default_model_dir, tmp_path_factory):
    from servers import gunicorn

    env = {"LLM_MODEL_PATH": default_model_dir, "LLM_MODEL_ID": "smollm2", "LLM_EAGER_LOAD": "1", "LLM_INTER_THREADS": "1",
           "LLM_MAX_BATCH_SIZE": "1", "LLM_MAX_QUEUE": "1", "LLM_BATCH_GATHER_MS": "0"}
    with gunicorn("wsgi:app", env, str(tmp_path_factory.mktemp("q") / "q.log"), "/v1/models") as server:
        yield server


def test_overload_errors_over_http(tiny_queue_server):
    base = tiny_queue_server.base
    long = {"model": "smollm2", "messages": [{"role": "user", "content": STORY.format("a ship")}], "max_tokens": 400,
            "min_tokens": 400, "temperature": 0, "stream": True}
    busy = requests.post(base + "/v1/chat/completions", json=long, stream=True, timeout=60)
    lines = busy.iter_lines()
    next(line for line in lines if b"content" in line and b'"content":""' not in line)
    short = {**long, "max_tokens": 2, "min_tokens": 0}
    queued = threading.Thread(target=lambda: requests.post(base + "/v1/chat/completions", json=short, timeout=120))
    queued.start()
    import time

    time.sleep(0.5)
    oai = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.RateLimitError) as info:
        oai.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert info.value.response.headers["Retry-After"] == "1"
    ant = anthropic.Anthropic(base_url=base, api_key="x", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as info:
        ant.messages.create(model="smollm2", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 529 and info.value.body["error"]["type"] == "overloaded_error"
    assert info.value.response.headers["Retry-After"] == "1"
    busy.close()
    queued.join(120)
    ok = requests.post(base + "/v1/chat/completions", json={**long, "max_tokens": 2, "min_tokens": 0, "stream": False}, timeout=60)
    assert ok.status_code == 200


def test_a_late_request_joins_a_young_batch_instead_of_waiting_for_it(model):
    engine = Engine(model, batching=BatchingOptions(gather_seconds=0, join_tokens=16))
    try:
        first = engine.generate(GenerationRequest(_prompt(model, "a cat"), 120, min_tokens=30, temperature=0))
        next(e for e in first if isinstance(e, TextDelta))  # the only replica is busy with a batch of one
        late = engine.generate(GenerationRequest(_prompt(model, "a dog"), 30, min_tokens=30, temperature=0))  # same settings
        got_first_token_while_running = False
        for event in late:
            if isinstance(event, TextDelta):
                got_first_token_while_running = engine.running == 2
                break
        late.close()
        assert got_first_token_while_running  # it did not wait ~120 tokens for the first batch to end
        assert engine.batch_sizes[:2] == [1, 2]  # the young batch restarted with the newcomer
        texts, finishes, done, _ = collect(first, 1)
        assert done.completion_tokens > 20 and finishes[0].reason in ("length", "stop")  # the restarted entry continued
    finally:
        engine.shutdown()


def _after_tokens(stream, n: int) -> None:
    deltas = 0
    for event in stream:
        deltas += isinstance(event, TextDelta)
        if deltas == n:
            return


def test_an_old_batch_is_not_restarted_when_the_newcomer_would_wait_less_than_it_costs(model):
    engine = Engine(model, batching=BatchingOptions(gather_seconds=0, join_tokens=4))
    try:
        first = engine.generate(GenerationRequest(_prompt(model, "a cat"), 60, min_tokens=20, temperature=0))
        _after_tokens(first, 40)  # at most 20 tokens to go; restarting would re-read 40 of them one by one
        late = engine.generate(GenerationRequest(_prompt(model, "a dog"), 20, min_tokens=20, temperature=0))  # compatible
        collect(first, 1)
        collect(late, 1)
        assert engine.batch_sizes == [1, 1]
    finally:
        engine.shutdown()


def test_an_old_batch_restarts_merged_with_a_newcomer_when_that_saves_its_wait(model):
    engine = Engine(model, batching=BatchingOptions(gather_seconds=0, join_tokens=4))
    try:
        # equal min_tokens: CTranslate2 applies one minimum length to a whole batch
        first = engine.generate(GenerationRequest(_prompt(model, "a cat"), 200, min_tokens=20, temperature=0))
        _after_tokens(first, 8)  # past the young-batch window, up to 192 tokens to go
        late = engine.generate(GenerationRequest(_prompt(model, "a dog who learns to sing in a choir"), 20,
                                                 min_tokens=20, temperature=0))  # another prompt length
        next(e for e in late if isinstance(e, TextDelta))
        assert engine.running == 2  # its first token came while the first request still runs
        assert engine.batch_sizes[:2] == [1, 2]  # the old batch restarted, merged with it
        texts, finishes, done, _ = collect(first, 1)
        assert done.completion_tokens > 20 and finishes[0].reason in ("length", "stop")  # the restarted entry went on
        collect(late, 1)
    finally:
        engine.shutdown()


def test_arrivals_are_shared_between_replicas_running_young_batches(default_model_dir):
    # Two replicas, each running a young batch of one: ten arrivals are split between them (each young batch
    # restarts for its share), not all taken by whichever restarts first.
    two = Model(default_model_dir, ModelOptions(device="cpu", inter_threads=2, intra_threads=1))
    engine = Engine(two, batching=BatchingOptions(gather_seconds=0, join_tokens=16, max_batch_size=16))
    try:
        def request(topic):
            return GenerationRequest(_prompt(two, topic), 40, min_tokens=40, temperature=0)

        topics = ("a cow", "a fox", "a hen", "a pig", "an owl", "a bee", "a rat", "a yak", "an elk", "a ram")
        arrivals = [request(t) for t in topics]  # tokenized first: they arrive while both batches are young
        first = [engine.generate(request(t)) for t in ("a cat", "a dog")]
        for stream in first:
            next(e for e in stream if isinstance(e, TextDelta))
        assert engine.batch_sizes == [1, 1]  # one on each replica
        late = [engine.generate(r) for r in arrivals]
        results = [collect(s, 1) for s in first + late]
        assert all(done.completion_tokens == 40 for _, _, done, _ in results)
        assert max(engine.batch_sizes) <= 8, engine.batch_sizes  # 12 entries over two replicas: about 6 each
    finally:
        engine.shutdown()
