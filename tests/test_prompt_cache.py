"""The prompt cache: its decisions, its equality with uncached output, its memory bound, and its usage fields
through the official SDKs against gunicorn -k gevent."""

from __future__ import annotations

import threading
import time

import pytest
import requests
from outcomes import wait_idle

from llm_blueprint.engine import Model, ModelOptions
from llm_blueprint.engine.generation import BatchingOptions, Engine
from llm_blueprint.engine.prompt_cache import PromptCache, read_spec_summary, state_bytes_per_token
from llm_blueprint.events import GenerationRequest, collect

# ~1,000 tokens of varied text: a long system prompt of the kind clients repeat in every request.
TOPICS = ["invoices", "shipping", "refunds", "warranty", "accounts", "passwords", "orders", "delivery", "returns",
          "discounts", "payments", "subscriptions", "support hours", "privacy", "cookies", "gift cards"]
SYSTEM = "You are the help desk assistant of Example Store. " + " ".join(
    f"Rule {i}: when a customer asks about {TOPICS[i % len(TOPICS)]}, answer politely, cite policy section {i}, "
    f"and never promise anything beyond {i + 2} business days." for i in range(40))


# ----------------------------------------------------------------------------- decisions (no engine)
def _cache(capacity_tokens: int = 10_000, min_tokens: int = 4) -> PromptCache:
    return PromptCache(bytes_per_token=10, budget_bytes=capacity_tokens * 10, min_tokens=min_tokens)


def test_an_automatic_point_is_stored_once_then_read_by_prompts_that_start_with_it():
    cache = _cache()
    ids = list(range(100))
    first = cache.plan(ids, points=(60,), explicit=())
    assert first.store and first.length == 60
    assert cache.plan(list(range(60)) + [7, 8], points=(60,), explicit=()) is None  # being computed: wait for it
    cache.ready(first)
    again = cache.plan(list(range(60)) + [7, 8, 9], points=(60,), explicit=())
    assert not again.store and again.prefix == tuple(range(60))
    assert (cache.hits, cache.misses, cache.read_tokens, cache.written_tokens) == (1, 1, 60, 60)
    other = cache.plan(list(range(50)) + [1000] * 20, points=(), explicit=())  # shares only 50 tokens: no use
    assert other.length == 0


def test_a_prefix_being_computed_is_waited_for_only_when_no_computed_one_helps():
    cache = _cache()
    cache.ready(cache.plan(list(range(100)), points=(40,), explicit=()))
    conversation = cache.warm_plan(list(range(90)))  # an idle replica computes the conversation so far
    assert conversation.store and conversation.length == 90
    plan = cache.plan(list(range(95)), points=(40, 90), explicit=())
    assert plan.length == 40  # 55 tokens after the held system part beat waiting for 90 computed from scratch
    cache.ready(conversation)
    assert cache.plan(list(range(95)), points=(40, 90), explicit=()).length == 90


def test_a_longer_automatic_point_is_not_computed_from_scratch_when_a_shorter_one_is_held():
    cache = _cache()
    cache.ready(cache.plan(list(range(100)), points=(40,), explicit=()))
    plan = cache.plan(list(range(100)), points=(40, 90), explicit=())
    assert not plan.store and plan.length == 40  # 60 tokens to prefill beat 90 from scratch
    # the client's own point is stored when one reuse repays it: what is held covers less than half of it
    assert cache.plan(list(range(100)), points=(), explicit=(90,)).store
    cache2 = _cache()
    cache2.ready(cache2.plan(list(range(100)), points=(60,), explicit=()))
    assert cache2.plan(list(range(100)), points=(), explicit=(90,)).length == 60


def test_short_prefixes_and_a_prompt_equal_to_its_prefix_are_not_cached():
    cache = _cache(min_tokens=64)
    assert cache.plan(list(range(100)), points=(30,), explicit=()).length == 0
    assert cache.plan(list(range(100)), points=(100,), explicit=()).length == 0  # the call needs a token after it


def test_a_full_budget_asks_for_a_swap_and_keeps_the_recent_prefixes_to_hold_again():
    cache = _cache(capacity_tokens=200)
    a = cache.plan(list(range(150)), points=(120,), explicit=())
    cache.ready(a)
    assert cache.plan(list(range(120)) + [5], points=(120,), explicit=()).length == 120  # a hit
    b = cache.plan([9] * 150, points=(100,), explicit=())
    assert b.length == 0 and cache.swap_wanted  # 220 tokens would not fit
    assert cache.survivors() == []  # 120 tokens do not fit in half the capacity
    cache.swapped()
    assert cache.held_bytes == 0 and cache.generation == 1
    cache.ready(a)  # a batch of the old generator ending late changes nothing
    assert cache.plan([9] * 150, points=(100,), explicit=()).store


def test_the_state_size_is_read_from_the_model_file(default_model_dir):
    summary = read_spec_summary(f"{default_model_dir}/model.bin")
    assert summary["layers"] == 30 and summary["attention_width"] == 576  # SmolLM2-135M: 30 layers, 9 x 64
    assert state_bytes_per_token(default_model_dir, "cpu") == 30 * 2 * 576 * 4


# ----------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def model(default_model_dir):
    model = Model(default_model_dir, ModelOptions(inter_threads=2, intra_threads=1))
    yield model
    model.close()


def _chat_ids(model: Model, question: str) -> tuple[list[int], int]:
    ids = model.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])
    system = model.encode_text(model.render_chat([{"role": "system", "content": SYSTEM}], add_generation_prompt=False))
    assert ids[: len(system)] == system
    return ids, len(system)


def _answer(engine: Engine, ids: list[int], point: int):
    request = GenerationRequest(ids, max_tokens=24, temperature=0, cache_points=(point,))
    texts, finishes, done, _ = collect(engine.generate(request), 1)
    return texts[0], done


def test_greedy_output_with_the_cache_equals_output_without_it(model):
    """Deterministic mode splits a prompt's prefill after its longest cache point whether that prefix is held, stored
    now or not cached at all, so greedy output does not depend on the cache. (Otherwise a hit on a shorter prefix
    splits the prefill elsewhere, which, like another batch composition, can change an int8 near-tie.)"""
    batching = BatchingOptions(gather_seconds=0, deterministic=True)
    plain = Engine(model, batching=batching)
    cached = Engine(model, batching=batching, prompt_cache=PromptCache(state_bytes_per_token(model.path, "cpu"), 512 * 2**20))
    try:
        for question in ("What are your support hours?", "Can I return a gift card?"):
            ids, point = _chat_ids(model, question)
            reference, reference_done = _answer(plain, ids, point)
            stored, stored_done = _answer(cached, ids, point)
            read, read_done = _answer(cached, ids, point)
            assert reference and stored == reference and read == reference
            assert (reference_done.cached_tokens, reference_done.cache_write_tokens) == (0, 0)
            if question.startswith("What"):  # the first question stores the system prompt, the second reads it
                assert (stored_done.cache_write_tokens, stored_done.cached_tokens) == (point, 0)
            else:
                assert (stored_done.cache_write_tokens, stored_done.cached_tokens) == (0, point)
            assert (read_done.cache_write_tokens, read_done.cached_tokens) == (0, point)
    finally:
        plain.shutdown()
        cached.shutdown()


def test_a_held_state_gives_the_answer_its_computation_gave(model):
    """Default mode: reading a held prefix continues from exactly the state that storing it computed."""
    engine = Engine(model, batching=BatchingOptions(gather_seconds=0),
                    prompt_cache=PromptCache(state_bytes_per_token(model.path, "cpu"), 512 * 2**20))
    try:
        ids, point = _chat_ids(model, "Is my password safe with you?")
        stored, stored_done = _answer(engine, ids, point)
        read, read_done = _answer(engine, ids, point)
        assert stored and read == stored
        assert stored_done.cache_write_tokens == point and read_done.cached_tokens == point
    finally:
        engine.shutdown()


def test_a_full_cache_swaps_in_a_fresh_generator_while_requests_go_on(model):
    per_token = state_bytes_per_token(model.path, "cpu")
    # room for one system prompt's state (beyond the weights a swap briefly doubles), not two
    budget = model.weights_bytes + int(1.5 * len(_chat_ids(model, "x")[0]) * per_token)
    engine = Engine(model, batching=BatchingOptions(gather_seconds=0), prompt_cache=PromptCache(per_token, budget,
                                                                                             weights_bytes=model.weights_bytes))
    first_generator = model.generator
    try:
        ids, point = _chat_ids(model, "Where is my order?")
        assert _answer(engine, ids, point)[1].cache_write_tokens == point
        results, errors = [], []

        def ask(n: int) -> None:  # other system prompts: each would need the room the first one holds
            try:
                other = model.encode_chat([{"role": "system", "content": SYSTEM.replace("Rule", f"Policy {n}")},
                                           {"role": "user", "content": "Hello?"}])
                text, done = _answer(engine, other, len(other) - 8)
                results.append((text, done))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=ask, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors and len(results) == 4 and all(text for text, _ in results)
        deadline = time.monotonic() + 60
        while engine.prompt_cache.swaps == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert engine.prompt_cache.swaps >= 1 and model.generator is not first_generator
        assert engine.prompt_cache.held_bytes <= engine.prompt_cache.capacity
        # the cache works on the fresh generator: the same prompt is read from it within a few requests (a swap
        # that the other system prompts asked for may still be due, and one request computes the prefix)
        ids2, point2 = _chat_ids(model, "Do you ship abroad?")
        cached = []
        for _ in range(4):
            cached.append(_answer(engine, ids2, point2)[1].cached_tokens)
            if cached[-1]:
                break
        assert cached[-1] == point2, cached
    finally:
        engine.shutdown()


# ----------------------------------------------------------------------------- through the SDKs
@pytest.fixture()
def served(api_server):
    wait_idle(api_server.base)
    return api_server


def test_openai_usage_reports_cached_tokens_and_answers_match(served, openai_client):
    question = [{"role": "system", "content": SYSTEM + " (openai)"}, {"role": "user", "content": "How do refunds work?"}]
    first = openai_client.chat.completions.create(model="smollm2", messages=question, max_tokens=16, temperature=0)
    second = openai_client.chat.completions.create(model="smollm2", messages=question, max_tokens=16, temperature=0)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert first.usage.prompt_tokens_details.cache_write_tokens > 900
    assert second.usage.prompt_tokens_details.cache_write_tokens == 0
    assert 900 < second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    assert second.choices[0].message.content == first.choices[0].message.content
    stream = openai_client.chat.completions.create(model="smollm2", messages=question, max_tokens=16, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
    usage = [c.usage for c in stream if c.usage][0]
    assert usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens_details.cached_tokens
    responses = openai_client.responses.create(model="smollm2", instructions=SYSTEM + " (openai)",
                                               input="How do refunds work?", max_output_tokens=16)
    assert responses.usage.input_tokens_details.cached_tokens > 900


def test_anthropic_cache_control_writes_then_reads_and_the_counts_add_up(served, anthropic_client):
    system = [{"type": "text", "text": SYSTEM + " (anthropic)", "cache_control": {"type": "ephemeral"}}]
    messages = [{"role": "user", "content": "Can I change my delivery address?"}]
    total = anthropic_client.messages.count_tokens(model="smollm2", system=system, messages=messages).input_tokens
    first = anthropic_client.messages.create(model="smollm2", max_tokens=8, system=system, messages=messages)
    with anthropic_client.messages.stream(model="smollm2", max_tokens=8, system=system, messages=messages) as stream:
        start = next(event for event in stream if event.type == "message_start").message.usage
        second = stream.get_final_message()
    # message_start already has the cache's figures, as Anthropic's does (issue #36: it said 0 read, all input)
    assert (start.input_tokens, start.cache_read_input_tokens, start.cache_creation_input_tokens) == \
        (second.usage.input_tokens, second.usage.cache_read_input_tokens, second.usage.cache_creation_input_tokens)
    assert first.usage.cache_creation_input_tokens > 900 and first.usage.cache_read_input_tokens == 0
    assert second.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens
    assert second.usage.cache_creation_input_tokens == 0
    for usage in (first.usage, second.usage):
        assert usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens == total
    assert first.usage.cache_creation.ephemeral_5m_input_tokens == first.usage.cache_creation_input_tokens


def test_a_bad_cache_control_is_a_400_in_anthropics_envelope(served):
    body = {"model": "smollm2", "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control": {"type": "forever"}}]}]}
    reply = requests.post(served.base + "/v1/messages", json=body, timeout=30)
    assert reply.status_code == 400
    assert reply.json()["type"] == "error" and reply.json()["error"]["type"] == "invalid_request_error"
    assert "cache_control" in reply.json()["error"]["message"]


@pytest.fixture(scope="module")
def two_replicas(default_model_dir, tmp_path_factory):
    """A server with two engine replicas whatever this machine's measured layout: a conversation is held by an idle
    replica only while another stays free for arrivals."""
    from servers import gunicorn

    log = str(tmp_path_factory.mktemp("logs") / "two-replicas.log")
    env = {"LLM_MODEL_PATH": default_model_dir, "LLM_MODEL_ID": "smollm2", "LLM_EAGER_LOAD": "1",
           "LLM_INTER_THREADS": "2", "LLM_INTRA_THREADS": "1"}
    with gunicorn("wsgi:app", env, log, "/v1/models") as server:
        yield server


def _written(base: str) -> tuple[float, str]:
    metrics = requests.get(base + "/metrics", timeout=10).text
    line = [x for x in metrics.splitlines() if x.startswith('llm_prompt_cache_tokens_total{direction="written",')]
    return (float(line[0].split()[-1]) if line else 0.0), metrics


def test_the_next_turn_of_a_conversation_reads_the_answered_conversation(two_replicas):
    import openai

    client = openai.OpenAI(base_url=two_replicas.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    before, _ = _written(two_replicas.base)
    conversation = [{"role": "system", "content": SYSTEM + " (turns)"}, {"role": "user", "content": "Hello, who are you?"}]
    first = client.chat.completions.create(model="smollm2", messages=conversation, max_tokens=24, temperature=0)
    conversation += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And what are your support hours?"}]
    deadline = time.monotonic() + 60  # an idle replica holds the answered conversation: wait for it, then ask
    while time.monotonic() < deadline:
        written, metrics = _written(two_replicas.base)
        if written - before > 2 * first.usage.prompt_tokens - 100:  # the system prompt, then the whole conversation
            break
        time.sleep(0.5)
    second = client.chat.completions.create(model="smollm2", messages=conversation, max_tokens=8, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > first.usage.prompt_tokens  # the system prompt, the first question and its answer
    assert second.usage.prompt_tokens - cached < 40  # only the new question and the turn's opening are computed
    _, metrics = _written(two_replicas.base)
    assert 'llm_prompt_cache_total{model="smollm2",result="hit"}' in metrics and "llm_prompt_cache_bytes" in metrics
