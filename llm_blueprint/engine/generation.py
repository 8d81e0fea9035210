"""The engine: batches generation requests onto CTranslate2 and streams each one's events.

A :class:`~llm_blueprint.events.GenerationRequest` goes in, an
:class:`~llm_blueprint.events.EventStream` comes out. Requests arrive through
the :class:`~llm_blueprint.runtime.Runtime` (which adds the metrics); the
engine knows nothing of HTTP and the routes nothing of CTranslate2.

The engine is the facade and the worker loop. Its rooms: one request's
completions token by token (completion.py), the scheduling policy and its
queue (scheduler.py), the prompt cache's decisions (cache_plan.py), the only
call into CTranslate2's ``generate_batch`` (ct2_batch.py), scoring passes
(scoring.py). Token processing runs inside CTranslate2's per-token callback on
the engine's native thread, so a completion stops the moment a stop string
appears; the consumer only receives finished events.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator

from ..errors import ContextTooLong, EngineDead, EngineShutDown, InvalidRequest, Overloaded
from ..events import Done, Event, EventStream, GenerationRequest, Heartbeat, TokenLogprob
from . import ct2_batch, scoring
from .cache_plan import CachePlanner
from .completion import Entry, Job
from .cores import CoreBudget
from .handoff import Channel, Empty, NativeThread, allocate_native_lock
from .memory import EngineMemory, MemoryBudget
from .model import Model
from .prompt_cache import PromptCache, release_freed_memory
from .scheduler import BatchingOptions, BatchState, Scheduler

log = logging.getLogger(__name__)

__all__ = ["BatchingOptions", "Engine"]


class Engine:
    """Batches concurrent requests onto CTranslate2 and streams their events to any consumer.

    CTranslate2 cannot add entries to a batch that is already running, so a
    batch that started without a request can never take it in. The engine
    therefore runs one native worker per engine replica (the model's
    ``inter_threads``): each worker takes a batch from the scheduler (which
    decides who runs together, who joins, when a batch restarts: see
    scheduler.py), runs it as one ``generate_batch`` call (ct2_batch.py) and
    hands it back. Entries of a batch stop individually (end token, stop
    string, ``max_tokens``, client gone) through the per-entry callback. Greedy
    outputs of restarted entries can differ slightly from an uninterrupted run
    (the re-prefilled tokens are computed in one pass instead of step by step).
    """

    def __init__(self, model: Model, heartbeat_interval: float = 2.0, batching: BatchingOptions | None = None,
                 prompt_cache: PromptCache | None = None, cores: CoreBudget | None = None,
                 memory: MemoryBudget | None = None):
        self.model = model
        self.cores = cores  # shared with the other chat models' engines (cores.py); None: this engine alone
        # The worker's memory for batches, shared with the other chat models' engines (memory.py)
        self.memory = EngineMemory(model, memory)
        self.heartbeat_interval = heartbeat_interval
        self.batching = batching or BatchingOptions()
        self.prompt_cache = prompt_cache
        replicas = max(1, model.inter_threads)
        self.scheduler = Scheduler(self.batching, replicas)
        self.scheduler.rows_that_fit = self.memory.rows_that_fit
        self.planner = CachePlanner(model, prompt_cache, self.scheduler, self.batching)
        self.scheduler.plan = self.planner.plan
        self._seed_lock = allocate_native_lock()
        self._running: set[Job] = set()
        self.batch_sizes: list[int] = []  # every batch run, for tests and metrics
        self.shared_head_tokens_saved = 0  # prefill tokens saved by heads shared within a batch (read by the metrics)
        self.invariant_violations = 0  # entries ended because their tokens did not continue what was fed
        self._released_at = 0.0  # when idle memory was last given back (_release_when_idle)
        self._closed = False
        self.failure: str | None = None  # why a worker died (the engine takes no more work then)
        self._threads = [NativeThread(self._worker, f"llm-engine-{i}") for i in range(replicas)]
        for thread in self._threads:
            thread.start()

    # Public API ---------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        """Raise a typed error before any work starts."""
        if not request.prompt_ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if request.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        if request.n < 1:
            raise InvalidRequest("n must be at least 1", param="n")
        if request.min_tokens > request.max_tokens:
            raise InvalidRequest("min_tokens must not exceed max_tokens", param="min_tokens")
        if len(request.prompt_ids) + request.max_tokens > self.model.context_length:
            raise ContextTooLong(len(request.prompt_ids), request.max_tokens, self.model.context_length)
        self.memory.check(len(request.prompt_ids), request.max_tokens)

    @property
    def context_limit(self) -> int:
        """The context a request may use: the model's, or less where the worker's memory budget holds less."""
        return self.memory.context_limit

    def _check_running(self) -> None:
        if self.failure is not None:
            raise EngineDead(self.failure)
        if self._closed:
            raise EngineShutDown("the engine is shutting down")

    def generate(self, request: GenerationRequest) -> EventStream[Event]:
        """Validate, enqueue, and return the event iterator.

        Raises :class:`Overloaded` at once when the queue is full, :class:`EngineDead` when a worker died.
        Closing the iterator (client gone → ``GeneratorExit``) cancels the generation within a token; the other
        requests are untouched.
        """
        self.validate(request)
        self._check_running()
        if self.queued + request.n > self.batching.max_queue:
            raise Overloaded(f"{self.queued} completions are already waiting; retry shortly", retry_after=1)
        job = Job(self.model, request, Channel())
        self.scheduler.submit(job.entries)
        return EventStream(self._events(job), cancel=job.cancel)

    def warm(self, ids: list[int]) -> None:
        """Ask an idle replica to hold the state after ``ids`` in the prompt cache (see CachePlanner.warm)."""
        if not self._closed and self.failure is None:
            self.planner.warm(ids, len(self._threads))

    def score_continuations(self, prompt_ids: list[int], continuations: list[list[int]]) -> list[float]:
        """Log-probability of each continuation after the prompt (scoring.score_continuations)."""
        self._check_running()
        return scoring.score_continuations(self.model, prompt_ids, continuations)

    def prompt_logprobs(self, prompt_ids: list[int], top: int = 0) -> list[TokenLogprob]:
        """Log-probability of each prompt token after the ones before it (scoring.prompt_logprobs)."""
        self._check_running()
        return scoring.prompt_logprobs(self.model, prompt_ids, top)

    @property
    def alive(self) -> bool:
        return not self._closed and self.failure is None and all(t.alive for t in self._threads)

    @property
    def queued(self) -> int:
        """Entries waiting for a batch."""
        return len(self.scheduler.pending)

    @property
    def running(self) -> int:
        """Requests with at least one entry in a running batch."""
        return len(self._running)

    @property
    def restarts(self) -> dict[str, int]:
        return self.scheduler.restarts

    @property
    def resumes(self) -> int:
        return self.scheduler.resumes

    def cancel_all(self) -> None:
        """End every waiting and running generation now (each stream gets its final events)."""
        for job in list(self._running):
            job.cancelled = True
        for entry in self.scheduler.drain():
            entry.finish("cancelled")

    def shutdown(self, timeout: float = 10.0) -> bool:
        """Stop taking work, cancel what runs or waits, join the threads. True when all stopped."""
        if self._closed:
            return True
        self._closed = self.planner.closed = True
        self.cancel_all()
        for _ in self._threads:
            self.scheduler.wakeup.put(None)
        deadline = time.monotonic() + timeout
        return all(t.join(max(0.0, deadline - time.monotonic())) for t in self._threads)

    # Consumer side ------------------------------------------------------------
    def _events(self, job: Job) -> Iterator[Event]:
        try:
            while True:
                try:
                    event = job.channel.get(timeout=self.heartbeat_interval)
                except Empty:
                    yield Heartbeat()
                    continue
                yield event
                if isinstance(event, Done):
                    return
        finally:
            job.cancelled = True  # no-op when finished; stops the engine work otherwise

    # Engine threads -------------------------------------------------------------
    def _worker(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # outside any batch: a bug or a native failure, and this replica is gone
            self._died(exc)

    def _died(self, exc: BaseException) -> None:
        """A worker died: the engine takes no more work (EngineDead, a 503), readiness fails, every waiting and
        running request ends with an error now rather than waiting forever; logged once."""
        if self.failure is None:
            self.failure = f"{type(exc).__name__}: {exc}"
            log.critical("an engine worker died; the engine takes no more work until the process restarts",
                         exc_info=exc)
        self.planner.closed = True
        for job in list(self._running):
            job.cancelled = True
        for entry in self.scheduler.drain():
            entry.finish("error", error=f"the engine stopped: {self.failure}")
        for _ in self._threads:  # the other workers stop too
            self.scheduler.wakeup.put(None)

    def _serve(self) -> None:
        scheduler = self.scheduler
        while True:
            scheduler.set_idle(+1)
            token = scheduler.wakeup.get()
            scheduler.set_idle(-1)
            if token is None:
                return
            if self.batching.gather_seconds > 0:
                scheduler.gather()
            batch, state = scheduler.take_batch(self.model.generator)
            if not batch and state is None:
                continue
            taken = self.cores.acquire(self.model.intra_threads) if self.cores is not None else 0
            try:
                if not batch:
                    self.planner.run_warm(state, self.memory.try_take, self.memory.release)
                    continue
                if scheduler.pending:
                    scheduler.wakeup.put(True)  # what did not fit goes to the next idle worker
                while batch:  # a batch, then the merged batch its restart asked for, if any
                    held = self.memory.take(batch, state.plan)
                    try:
                        batch, state = self._run_batch(batch, state)
                    finally:
                        self.memory.release(held)
            finally:
                if taken:
                    self.cores.release(taken)
            if scheduler.pending:
                scheduler.wakeup.put(True)  # leftovers that did not fit this batch
            else:
                self._release_when_idle()

    def _release_when_idle(self) -> None:
        """When the last batch ends and nothing waits, give freed memory back to the system (glibc keeps the freed
        buffers of the batches in its heap, which the raised mmap threshold makes them come from): an idle worker
        grew by about 100 MB after bursts of vanishing clients otherwise (tests/test_hostile_clients.py, on
        oneDNN). At most once a second: under steady load the heap is reused, not returned."""
        scheduler = self.scheduler
        now = time.monotonic()
        with scheduler.lock:
            if scheduler.pending or scheduler.batches_running or now - self._released_at < 1.0:
                return
            self._released_at = now
        release_freed_memory()
        if self.planner.warm_queue:  # a warm-up asked for meanwhile found no other replica free: retry
            scheduler.wakeup.put(True)

    def _run_batch(self, batch: list[Entry], state: BatchState) -> tuple[list[Entry], BatchState | None]:
        """Run one batch; returns the merged batch to run next when it restarted for waiting requests that do not
        share its prompt length (else an empty list: survivors of a young batch's restart queue up first)."""
        jobs = {entry.job for entry in batch}
        self._running.update(jobs)
        merged: list[Entry] = []
        following = None
        try:
            self._run(batch, state)
        except Exception as exc:
            log.exception("generation failed")
            for entry in batch:
                entry.finish("error", error=str(exc))
        finally:
            self.planner.plan_done(state)
            survivors, merged, following = self.scheduler.settle(batch, state)
            for entry in batch:  # an entry the engine ended without a final step
                if entry not in survivors:
                    entry.finish("cancelled" if entry.job.cancelled else "length")
                    if not entry.job.cancelled:
                        self.scheduler.note_finished(entry)
            self._running.difference_update(jobs)
            self.planner.release(state)
        self.scheduler.note_steps(state)
        if log.isEnabledFor(logging.DEBUG) and state.started:
            _log_batch(len(batch), state)
        return merged, following

    def _run(self, batch: list[Entry], state: BatchState) -> None:
        first = batch[0].job.request
        seeded = first.seed is not None and not first.greedy
        rows = [e.job.request.prompt_ids + e.generated for e in batch]
        static, keep = state.plan.length, state.plan.keep
        if not static and (head := _shared_head(rows, self.model.sliding_window, self.batching.shared_head_tokens)):
            static, keep, state.head = head, False, head
            self.shared_head_tokens_saved += head * (len(rows) - 1)
        call = ct2_batch.BatchCall(
            rows=rows,
            max_new=[e.job.request.max_tokens - e.tokens for e in batch],
            min_new=[max(0, e.job.request.min_tokens - e.tokens) for e in batch],
            end_tokens=self.model.tokenizer.ids_to_tokens(sorted(batch[0].job.end_ids)),
            sampling=ct2_batch.Sampling(first.greedy, first.temperature, first.top_p, first.top_k,
                                        first.repetition_penalty),
            static=static,
            keep=keep,
            return_scores=any(e.job.request.logprobs for e in batch),
            # A vocabulary-sized copy per token and entry: only when an entry asked for alternatives or is constrained.
            want_logits=any(e.job.constrained or (e.job.request.logprobs and e.job.request.top_logprobs) for e in batch),
            window=self.model.sliding_window,
            keys=list(batch),
        )

        def on_token(i: int, step, row) -> bool:
            if not state.prefilled:
                self.planner.prefilled(state)
            state.steps = step.step + 1
            return batch[i].on_step(step, row) or (not seeded and self.scheduler.should_restart(batch, state, step))

        def on_violation(i: int, problem: str) -> None:
            self.invariant_violations += 1
            log.error("generation invariant broken, entry ended: %s", problem)
            batch[i].finish("error", error="internal error: the engine lost track of this completion's tokens")

        self.batch_sizes.append(len(batch))
        state.prefill_tokens = sum(len(r) - static for r in rows) + state.head
        state.started = time.monotonic()
        if seeded:
            job = batch[0].job
            generated = sum(len(e.generated) for e in job.entries)
            ct2_batch.run_seeded(self.model, self._seed_lock, job.request.seed + 7919 * generated, call, on_token,
                                 on_violation)
        else:
            ct2_batch.run(state.generator, self.model.vocabulary, call, on_token, on_violation)


def _shared_head(rows: list[list[int]], window: int, minimum: int) -> int:
    """The head a batch's rows share, prefilled once for them all (0: none, or shorter than ``minimum``; 0 turns it
    off). CTranslate2 computes a static prompt once (batch of one) and copies its state to every entry. The head
    leaves two tokens of the shortest row (a single one would make CTranslate2 echo the longer rows' rests), and stays
    within a sliding window (longer ones are only safe decoded one token at a time)."""
    if len(rows) < 2 or not minimum:
        return 0
    head = min(len(os.path.commonprefix(rows)), min(map(len, rows)) - 2)
    if window:
        head = min(head, window)
    return head if head >= minimum else 0


def _log_batch(rows: int, state: BatchState) -> None:
    now = time.monotonic()
    log.debug("batch of %d (%d prompt tokens after %d cached, %d of them a shared head): prefill %.3f s, "
              "%d steps in %.3f s%s", rows, state.prefill_tokens, state.plan.length, state.head,
              (state.first_step_at or now) - state.started, state.steps, now - (state.first_step_at or now),
              ", restarted" + (f" with {len(state.joiners)} joining" if state.joiners else "") if state.restart else "")
