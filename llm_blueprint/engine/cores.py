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

from .budget import Budget


class CoreBudget(Budget):
    """Cores handed out to engine workers (native threads), in arrival order."""

    @property
    def cores(self) -> int:
        return self.capacity

    def acquire(self, wanted: int) -> int:
        """A replica that wants more threads than there are cores gets them all."""
        return super().acquire(min(wanted, self.capacity))
