"""The worker's memory for engine batches (engine/memory.py, LLM_MEMORY_LIMIT_MB): the budget's hand-out order, what
a batch is estimated to cost, the scheduler's cap on a batch's rows, and a real engine that refuses a prompt the
budget cannot hold (the protocol's context error) and runs two prompts that do not fit together one after the other.
Peak memory within the limit under gunicorn: tests/test_memory_limit_server.py."""

from __future__ import annotations

import threading
import time

import pytest

from llm_blueprint.engine import Model, ModelOptions
from llm_blueprint.engine.budget import Budget
from llm_blueprint.engine.generation import BatchingOptions, Engine
from llm_blueprint.engine.memory import MB, MemoryBudget, MemoryShape
from llm_blueprint.errors import ContextTooLong
from llm_blueprint.events import GenerationRequest, collect


def test_a_claim_waits_for_room_in_arrival_order_and_one_larger_than_all_runs_alone():
    budget = Budget(10)
    first = budget.acquire(6)
    order = []
    big = threading.Thread(target=lambda: order.append(("big", budget.acquire(25))))
    big.start()
    time.sleep(0.05)
    small = threading.Thread(target=lambda: order.append(("small", budget.acquire(2))))
    small.start()
    time.sleep(0.05)
    assert order == [] and budget.waits == 2  # the small one fits but may not overtake the big one
    assert budget.try_acquire(1) == 0  # nor may a warm-up
    budget.release(first)
    big.join(1)
    assert order == [("big", 25)] and budget.held == 25  # larger than the capacity: alone
    budget.release(25)
    small.join(1)
    assert order[-1] == ("small", 2)
    budget.release(2)
    assert budget.held == 0 and budget.try_acquire(10) == 10


def test_a_smaller_room_serves_waiting_claims_when_it_grows_again():
    budget = MemoryBudget(1000 * MB, 100 * MB)
    assert budget.capacity == 900
    budget.hold("a", 500 * MB)
    assert budget.capacity == 400
    taken = budget.acquire(300)
    got = []
    waiter = threading.Thread(target=lambda: got.append(budget.acquire(300)))
    waiter.start()
    time.sleep(0.05)
    assert got == []
    budget.drop("a")  # the model unloaded: its weights' room goes to the batches
    waiter.join(1)
    assert got == [300]
    budget.release(taken)
    budget.release(300)


def test_the_estimate_grows_with_the_context_and_a_sliding_window_bounds_the_scores():
    full = MemoryShape(state_bytes=138 * 1024, heads=9)
    windowed = MemoryShape(state_bytes=138 * 1024, heads=9, window=512)
    assert full.row_bytes(4000, 4000) > 3 * full.row_bytes(2000, 2000) / 2  # quadratic scores
    assert windowed.row_bytes(8000, 8000) < full.row_bytes(8000, 8000)
    assert windowed.row_bytes(16000, 16000) < 2.2 * windowed.row_bytes(8000, 8000)  # chunked prefill: linear
    assert full.row_bytes(16000, 16000) > 3 * full.row_bytes(8000, 8000)
    assert full.batch_bytes(2, full.row_bytes(10, 10)) < 2 * full.batch_bytes(1, full.row_bytes(10, 10))
    assert full.row_bytes(100, 4000, 4000) < full.row_bytes(4000, 4000)  # after a cached prefix
    room = 1500 * MB
    longest = full.longest_context(room)
    assert full.batch_bytes(1, full.row_bytes(longest, longest)) <= room
    assert full.batch_bytes(1, full.row_bytes(longest + 1, longest + 1)) > room
    assert windowed.longest_context(8000 * MB) > full.longest_context(8000 * MB)  # where the scores dominate


# ----------------------------------------------------------------------------- a real engine
@pytest.fixture(scope="module")
def model(default_model_dir):
    model = Model(default_model_dir, ModelOptions(inter_threads=2, intra_threads=1))
    yield model
    model.close()


def _prompt(model: Model, tokens: int) -> list[int]:
    words = " ".join(f"word{i % 97}" for i in range(tokens))
    return model.encode_chat([{"role": "user", "content": words}])[-tokens:]


def test_the_engine_refuses_what_the_budget_cannot_hold_and_serialises_what_does_not_fit_together(model):
    shape = MemoryShape.of(model.path, model.sliding_window)
    # room for one 700-token row, not two
    room = shape.batch_bytes(1, shape.row_bytes(730, 730))
    memory = MemoryBudget(room + 100 * MB, 100 * MB)
    assert memory.room_bytes <= room
    engine = Engine(model, batching=BatchingOptions(gather_seconds=0.05), memory=memory)
    try:
        assert engine.context_limit == shape.longest_context(memory.room_bytes) < model.context_length
        too_long = GenerationRequest(_prompt(model, 1000), max_tokens=8, temperature=0)
        with pytest.raises(ContextTooLong) as refused:
            engine.generate(too_long)
        assert refused.value.context_length == engine.context_limit
        assert "memory budget" in str(refused.value) and str(model.context_length) in str(refused.value)

        requests = [GenerationRequest(_prompt(model, 600), max_tokens=16, temperature=0) for _ in range(2)]
        streams = [engine.generate(r) for r in requests]
        results = [None, None]

        def drain(i):
            results[i] = collect(streams[i], 1)

        threads = [threading.Thread(target=drain, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert all(r is not None and r[1][0].reason in ("stop", "length") for r in results), results
        assert engine.batch_sizes == [1, 1]  # the scheduler never put them in one batch
        assert memory.waits >= 1  # and the second replica waited for the first's memory
        deadline = time.monotonic() + 5
        while memory.held and time.monotonic() < deadline:  # given back just after the streams' last events
            time.sleep(0.01)
        assert memory.held == 0
    finally:
        engine.shutdown()
