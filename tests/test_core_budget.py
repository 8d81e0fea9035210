"""The core budget that the engines of several chat models share (llm_blueprint/engine/cores.py): never more cores
handed out than the worker has, first come first served, nobody starved; with real native threads."""

from __future__ import annotations

import random
import threading
import time

from llm_blueprint.engine.cores import CoreBudget


def test_cores_are_never_oversubscribed_and_waiters_are_served_in_arrival_order():
    budget = CoreBudget(2)
    held, peak, order, lock = [0], [0], [], threading.Lock()
    rng = random.Random(7)

    def engine_worker(name: str, wanted: int, rounds: int) -> None:
        for i in range(rounds):
            taken = budget.acquire(wanted)
            with lock:
                held[0] += taken
                peak[0] = max(peak[0], held[0])
                order.append((name, i))
            time.sleep(rng.uniform(0.001, 0.01))  # a batch
            with lock:
                held[0] -= taken
            budget.release(taken)

    workers = [threading.Thread(target=engine_worker, args=(f"a{i}", 1, 20)) for i in range(2)]  # 2 replicas x 1 thread
    workers += [threading.Thread(target=engine_worker, args=("b", 2, 20))]  # 1 replica x 2 threads
    workers += [threading.Thread(target=engine_worker, args=("c", 5, 5))]  # asks for more than there is: gets all
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    assert not any(w.is_alive() for w in workers)  # nobody starved or deadlocked
    assert peak[0] <= 2 and held[0] == 0 and budget.free == 2
    assert sorted(name for name, _ in order).count("b") == 20 and budget.waits > 0


def test_a_waiter_is_not_overtaken_by_later_small_requests():
    budget = CoreBudget(2)
    first = budget.acquire(1)
    got = []
    big = threading.Thread(target=lambda: got.append(("big", budget.acquire(2))))
    big.start()
    time.sleep(0.05)
    small = threading.Thread(target=lambda: got.append(("small", budget.acquire(1))))
    small.start()
    time.sleep(0.05)
    assert got == []  # one core is free, but the big request came first: the small one waits behind it
    budget.release(first)
    big.join(5)
    assert got == [("big", 2)]
    budget.release(2)
    small.join(5)
    assert got[-1] == ("small", 1)
