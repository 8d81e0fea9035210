"""The prompt cache seen from the scheduler: which cached prefix a batch runs after, warm-ups, generator swaps.

The :class:`PromptCache` (prompt_cache.py) holds the book-keeping of the states
CTranslate2 keeps per replica; the :class:`CachePlanner` here makes the
engine's decisions with it: the plan of a batch (read a held prefix, store
one, or neither, and whether a long prefix past a sliding window is worth it),
holding a conversation's state on an idle replica for its next turn
(warm-ups), and loading a fresh generator in the background when the cache is
full (a swap; the old one's states go with it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from . import ct2_batch
from .completion import Entry, split_point
from .handoff import NativeThread
from .model import Model
from .prompt_cache import NO_PLAN, Plan, PromptCache, release_freed_memory
from .scheduler import BatchingOptions, BatchState, Scheduler

log = logging.getLogger(__name__)


class CachePlanner:
    """Prompt-cache decisions for one engine; its methods run on the engine's workers."""

    def __init__(self, model: Model, cache: PromptCache | None, scheduler: Scheduler, options: BatchingOptions):
        self.model = model
        self.cache = cache
        self.scheduler = scheduler
        self.options = options
        self.warm_queue: list[list[int]] = []  # conversations to hold when a replica is idle, newest last
        self.closed = False

    def plan(self, entry: Entry) -> Plan | None:
        """The cache plan for a batch seeded by ``entry`` (None: its prefix is being computed; wait for it).
        Called under the scheduling lock."""
        cache = self.cache
        request = entry.job.request
        if self.options.deterministic:  # the prefill is split after the request's longest point, cached or not
            split = split_point(entry)
            if not split:
                return NO_PLAN
            if cache is None:
                return Plan(tuple(request.prompt_ids[:split]), keep=False)
            plan = cache.plan_at(request.prompt_ids, split)
        elif cache is None or not cache.enabled:
            return NO_PLAN
        else:
            plan = cache.plan(request.prompt_ids + entry.generated, request.cache_points, request.cache_marks)
            if plan is not None and not self.long_prefix_pays(plan.length, entry.length - plan.length):
                cache.retract(plan)
                plan = NO_PLAN
        if cache.swap_wanted:
            self.start_swap()
        return plan

    def long_prefix_pays(self, prefix: int, rest: int) -> bool:
        """Whether running after a cached prefix longer than the model's sliding window beats prefilling the whole
        prompt. After such a prefix the rest can only be decoded one token per step (see ct2_batch: its
        multi-token forward corrupts the heap), a full decoding step per token: measured on Gemma 3 270M, 60-75 ms
        a token against 1.5 ms prefilled. So it pays for a short rest (a conversation's new message after a
        warm-up), not for a long one. Estimated with this engine's own measured step and prefill times."""
        window = self.model.sliding_window
        if not window or prefix <= window or rest < 2:
            return True
        per_token = self.scheduler.prefill_seconds_per_token or 0.002
        step = self.scheduler.step_seconds or 40 * per_token
        return rest * step < (prefix + rest) * per_token

    def prefilled(self, state: BatchState) -> None:
        """The batch's first step: a prefix it stores is held by the engine from now on; the prefill rate is known."""
        state.prefilled = True
        state.first_step_at = time.monotonic()
        self.scheduler.note_prefill(state)
        if state.plan.store:
            with self.scheduler.lock:
                self.cache.ready(state.plan)
            self.scheduler.wakeup.put(True)  # requests waiting for that prefix

    def plan_done(self, state: BatchState) -> None:
        if state.plan.store and not state.prefilled:
            with self.scheduler.lock:
                self.cache.forget(state.plan)
            self.scheduler.wakeup.put(True)

    def release(self, state: BatchState) -> None:
        """Drop the batch's generator; the last batch of a swapped-out one frees its states and weights."""
        old = state.generator is not None and state.generator is not self.model.generator
        state.generator = None
        if old:
            release_freed_memory()

    # Warm-ups ------------------------------------------------------------------
    def warm(self, ids: list[int], replicas: int) -> None:
        """Ask an idle replica to hold the state after ``ids`` (a conversation so far, so that its next turn
        prefills only the new message). Only while another replica stays free for arrivals: a warm-up cannot be
        interrupted once it started."""
        cache = self.cache
        if cache is None or not cache.enabled or replicas < 2 or self.closed:
            return
        with self.scheduler.lock:
            self.warm_queue = [w for w in self.warm_queue if w != ids][-3:] + [list(ids)]
        self.scheduler.wakeup.put(True)

    def run_warm(self, state: BatchState, memory: Callable[[int], int] = lambda tokens: -1,
                 release_memory: Callable[[int], None] = lambda taken: None) -> None:
        """Hold the newest requested conversation in the cache, when no request waits, another replica is free for
        arrivals and the worker's memory for batches has room for it now (``memory``: MB taken for that many tokens,
        0 when not free, -1 when there is no budget)."""
        scheduler = self.scheduler
        with scheduler.lock:
            if scheduler.pending or not self.warm_queue or scheduler.idle_workers < 1 or self.closed:
                return
            ids = self.warm_queue.pop()
            taken = memory(len(ids))
            if not taken:
                return  # no room now: a warm-up never delays a request
            try:
                state.plan = self.cache.warm_plan(ids)
            except BaseException:
                release_memory(taken)
                raise
            if self.cache.swap_wanted:
                self.start_swap()
            if not state.plan.store:
                release_memory(taken)
                return
            scheduler.batches_running += 1
        try:
            started = time.monotonic()
            ct2_batch.hold(state.generator, self.model.vocabulary, ids)
            state.prefilled = True
            with scheduler.lock:
                self.cache.ready(state.plan)
            log.debug("warm-up: held a conversation of %d tokens in %.3f s", len(ids), time.monotonic() - started)
        except Exception:
            log.exception("prompt cache warm-up failed")
        finally:
            self.plan_done(state)
            with scheduler.lock:
                scheduler.batches_running -= 1
            self.release(state)
            release_memory(taken)
        if scheduler.pending or self.warm_queue:
            scheduler.wakeup.put(True)

    # Generator swaps -------------------------------------------------------------
    def start_swap(self) -> None:
        """Load a fresh generator (empty cache) in the background; swapped in between batches. Under the lock."""
        cache = self.cache
        cache.swap_wanted = False
        if cache.swapping or self.closed:
            return
        cache.swapping = True
        NativeThread(self._swap, "llm-engine-swap").start()

    def _swap(self) -> None:
        cache = self.cache
        started = time.monotonic()
        try:
            fresh = self.model.new_generator()
        except Exception:
            log.exception("prompt cache: cannot load a fresh generator; the cache stays full")
            with self.scheduler.lock:
                cache.swapping = False
            return
        with self.scheduler.lock:
            keep = cache.survivors()
            freed = cache.held_bytes
            self.model.generator = fresh
            cache.swapped()
            self.warm_queue = [list(k) for k in reversed(keep)] + self.warm_queue
        release_freed_memory()  # the old generator is gone unless a batch still runs on it (that batch's end frees it)
        log.info("prompt cache full: swapped in a fresh generator in %.2f s (%.0f MB of held states go with the old "
                 "one; %d recent prefixes to hold again)", time.monotonic() - started, freed / 2**20, len(keep))
        self.scheduler.wakeup.put(True)
