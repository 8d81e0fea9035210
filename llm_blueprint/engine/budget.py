"""A budget of units (cores, megabytes) that native engine threads take before a batch and give back after it, in
arrival order (FIFO): a batch never overtakes an earlier one that waits for more than is free. Used for the cores
the chat models of a worker share (cores.py) and for the memory their batches may use (memory.py)."""

from __future__ import annotations

from collections import deque

from .handoff import allocate_native_lock


class Budget:
    """``capacity`` units handed out to native threads, first come first served. A claim larger than the whole
    capacity is granted when nothing else is held: it waits for every other holder, then runs alone."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self.held = 0
        self._lock = allocate_native_lock()
        self._waiting: deque[tuple[int, object]] = deque()  # (units wanted, a held lock released when granted)
        self.waits = 0  # claims that had to wait (read by the metrics, tests and benches)

    @property
    def free(self) -> int:
        return self.capacity - self.held

    def acquire(self, wanted: int) -> int:
        """Take ``wanted`` units, blocking the OS thread until they are free (or, for more than the capacity, until
        nothing is held) and every earlier claim was served; returns what was taken, for :meth:`release`."""
        wanted = max(1, wanted)
        with self._lock:
            if not self._waiting and self._fits(wanted):
                self.held += wanted
                return wanted
            gate = allocate_native_lock()
            gate.acquire()
            self._waiting.append((wanted, gate))
            self.waits += 1
        gate.acquire()  # released by _grant() once the units are ours
        return wanted

    def try_acquire(self, wanted: int) -> int:
        """Take ``wanted`` units if they are free now and nobody waits (returns them), else 0 at once."""
        wanted = max(1, wanted)
        with self._lock:
            if self._waiting or wanted > self.free:
                return 0
            self.held += wanted
            return wanted

    def release(self, taken: int) -> None:
        with self._lock:
            self.held -= taken
            self._grant()

    def resize(self, capacity: int) -> None:
        """A new capacity (claims already granted stay granted; waiting ones are served if they now fit)."""
        with self._lock:
            self.capacity = max(1, capacity)
            self._grant()

    def _fits(self, wanted: int) -> bool:  # under _lock
        return wanted <= self.free or (wanted > self.capacity and not self.held)

    def _grant(self) -> None:  # under _lock
        while self._waiting:
            wanted = self._waiting[0][0]
            if not self._fits(wanted):
                return
            _, gate = self._waiting.popleft()
            self.held += wanted
            gate.release()
