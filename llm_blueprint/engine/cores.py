"""The worker's cores, shared by the engines of several chat models.

Each engine is laid out for all of the worker's cores (replicas x threads =
cores, measured per model), so two engines running batches at the same moment
would run twice as many OpenMP threads as there are cores, and both would
crawl. A :class:`CoreBudget` prevents that: an engine worker takes its
replica's threads from the budget before a batch and gives them back after
it, first come first served. One model alone never waits (its replicas fit
the budget by construction); with two busy models, a batch of one waits for a
batch of the other to end. The cost is that wait: a batch is a whole
``generate_batch`` call (bench/several_models.py measures it).
"""

from __future__ import annotations

from collections import deque

from .handoff import allocate_native_lock


class CoreBudget:
    """Cores handed out to engine workers (native threads), in arrival order."""

    def __init__(self, cores: int):
        self.cores = max(1, cores)
        self.free = self.cores
        self._lock = allocate_native_lock()
        self._waiting: deque[tuple[int, object]] = deque()  # (cores wanted, a held lock released when granted)
        self.waits = 0  # batches that had to wait for another engine's (read by tests and the bench)

    def acquire(self, wanted: int) -> int:
        """Take ``wanted`` cores (at most the budget), blocking the OS thread until they are free and every earlier
        waiter was served; returns what was taken, for :meth:`release`."""
        wanted = max(1, min(wanted, self.cores))
        with self._lock:
            if not self._waiting and self.free >= wanted:
                self.free -= wanted
                return wanted
            gate = allocate_native_lock()
            gate.acquire()
            self._waiting.append((wanted, gate))
            self.waits += 1
        gate.acquire()  # released by release() once the cores are ours
        return wanted

    def release(self, taken: int) -> None:
        with self._lock:
            self.free += taken
            while self._waiting and self._waiting[0][0] <= self.free:
                wanted, gate = self._waiting.popleft()
                self.free -= wanted
                gate.release()
