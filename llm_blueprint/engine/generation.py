"""The engine: batches generation requests onto CTranslate2 and streams each one's events.

A :class:`~llm_blueprint.events.GenerationRequest` goes in, an
:class:`~llm_blueprint.events.EventStream` comes out. Requests arrive through
``Runtime.generate`` (which adds the metrics), from the chat pipeline
(chat/pipeline.py) or the completions route; the engine knows nothing of HTTP
and the routes nothing of CTranslate2.

Token processing (incremental decoding, stop strings, counting) runs inside
CTranslate2's per-token callback on the engine's native thread, so a
completion stops the moment a stop string appears; the consumer only
receives finished events.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import ContextTooLong, EngineShutDown, InvalidRequest, Overloaded
from ..events import Done, Event, EventStream, Finish, GenerationRequest, Heartbeat, TextDelta, TokenLogprob
from . import ct2_batch
from .constraints import TokenMatcher, vocabulary_for
from .handoff import Channel, Empty, NativeThread, WorkQueue, allocate_native_lock, native_sleep, run_on_native_thread
from .model import Model
from .prompt_cache import NO_PLAN, Plan, PromptCache, release_freed_memory
from .text_stream import IncrementalDecoder, StopMatcher

log = logging.getLogger(__name__)

MAX_GATHER_SECONDS = 0.1  # a burst is gathered while it keeps arriving, never longer than this

DEFAULT_SEED = 2**32 - 1  # CTranslate2's "no seed": random_device on next use
CLOSING_TOKENS = 32  # a JSON constraint closes its value in at most this many last tokens of the budget


# ----------------------------------------------------------------------------- one running request
class _Entry:
    """One completion of a request: one batch entry. Touched only on engine threads."""

    def __init__(self, job: _Job, index: int, model: Model):
        request = job.request
        self.job = job
        self.index = index
        self.decoder = IncrementalDecoder(model.tokenizer, request.prompt_ids)
        self.stops = StopMatcher(request.stop)
        self.tokens = 0
        self.generated: list[int] = []  # to continue after a batch restart
        self.restarts = 0  # restarts of older batches merged with newcomers (bounded by max_restarts)
        self.young_restarts = 0  # restarts of young batches taking in arrivals (bounded by max_young_restarts)
        self.matcher: TokenMatcher | None = None
        if request.constraint is not None:
            self.matcher = TokenMatcher(vocabulary_for(model.tokenizer, model.end_token_ids), request.constraint)
            self._rng = np.random.default_rng(request.seed)
        self.resume = False  # stopped at a token its grammar forbids: goes back to the queue to continue
        self.resumes = 0
        self.finished = False
        self.pending_logprobs: list[TokenLogprob] = []

    @property
    def length(self) -> int:
        """Tokens the engine must prefill for this entry: prompt plus what it generated so far."""
        return len(self.job.request.prompt_ids) + len(self.generated)

    # Runs on the engine thread, once per generated token of this entry; ``logits``: this entry's row of the step's
    # logits (None unless the batch asked for them).
    def on_step(self, step, logits=None) -> bool:
        job = self.job
        if self.finished or self.resume:
            return True
        if job.cancelled:
            self.finish("cancelled")
            return True
        try:
            return self._accept(step, logits)
        except Exception as exc:  # never let an exception escape into C++
            log.exception("token processing failed")
            self.finish("error", error=str(exc))
            return True

    def _accept(self, step, logits) -> bool:
        token_id = step.token_id
        request = self.job.request
        if self.matcher is not None:
            closer = self.matcher.closer() if self._closing or self.matcher.runaway else None
            if closer is not None and closer != token_id:
                return self._replace(logits, closer)
            if not self.matcher.allows(token_id):
                return self._replace(logits, refused=token_id)
        if step.is_last and token_id in self.job.end_ids:
            self.finish("stop")
            return True
        top = _top_logprobs(logits, request.top_logprobs) if request.logprobs and request.top_logprobs else ()
        return self._take(token_id, float(step.log_prob or 0.0), top) or self._at_limit(step.is_last)

    def _take(self, token_id: int, logprob: float, top: tuple = ()) -> bool:
        """Adds one token to the completion; True when that ended it."""
        request = self.job.request
        self.tokens += 1
        self.generated.append(token_id)
        if request.logprobs:
            self.pending_logprobs.append(TokenLogprob(token_id, logprob, top))
        text = self.decoder.push(token_id)
        if text:
            visible, matched = self.stops.feed(text)
            self._emit(visible)
            if matched is not None:
                self.finish("stop_sequence", stop_sequence=matched)
                return True
        if self.matcher is not None:
            self.matcher.accept(token_id)
            if self.matcher.complete:
                if self.matcher.error:
                    self.finish("error", error=f"constraint failed: {self.matcher.error}")
                else:
                    self.finish("stop")
                return True
        return False

    def _at_limit(self, last_step: bool) -> bool:
        if last_step or self.tokens >= self.job.request.max_tokens:
            self.finish("length")
            return True
        return False

    @property
    def _closing(self) -> bool:
        """The last tokens of the budget of a JSON constraint: time to close the value."""
        budget = self.job.request.max_tokens
        return self.job.request.constraint.json and budget - self.tokens <= min(CLOSING_TOKENS, max(4, budget // 4))

    def _replace(self, logits, token_id: int | None = None, refused: int | None = None) -> bool:
        """The model sampled a token the grammar forbids (or, near the budget's end, one that does not close the
        JSON value): write ``token_id`` or the best allowed token instead, then what the grammar forces and what
        closes the value, and stop this entry so that it resumes from there (the model's state has seen the
        refused token). Always True: the entry leaves this batch."""
        matcher = self.matcher
        if token_id is None:
            choice = matcher.choose(logits, self.job.request, self._rng, refused)
            if choice is None:
                self.finish("error", error=f"constraint failed: {matcher.error or 'no token is allowed'}")
                return True
            token_id = choice[0]
        if token_id in self.job.end_ids:
            self.finish("stop")
            return True
        while token_id is not None:
            if self._take(token_id, matcher.logprob(logits, token_id)) or self._at_limit(False):
                return True
            logits = None  # the tokens after the first were not seen by the model
            for forced in matcher.forced():
                if self._take(forced, 0.0) or self._at_limit(False):
                    return True
            token_id = matcher.closer() if self._closing else None
        self.resume = True
        return True

    def _emit(self, text: str) -> None:
        if text:
            logprobs, self.pending_logprobs = tuple(self.pending_logprobs), []
            self.job.channel.put(TextDelta(self.index, text, logprobs))

    def finish(self, reason: str, stop_sequence: str | None = None, error: str | None = None, release: bool = True) -> None:
        if self.finished:
            return
        if release and reason in ("stop", "length"):  # held text is released; a stop match never is
            self._emit(self.decoder.flush())
            self._emit(self.stops.flush())
        self.finished = True
        self.job.channel.put(Finish(self.index, reason, self.tokens, stop_sequence, error))
        self.job.entry_finished()


def _split_point(entry: _Entry) -> int:
    """Deterministic mode: where a prompt's prefill is split, whatever the cache holds (its longest cache point)."""
    request = entry.job.request
    points = [p for p in (*request.cache_points, *request.cache_marks) if 0 < p < len(request.prompt_ids)]
    return max(points, default=0)


def _top_logprobs(logits, k: int) -> tuple[tuple[int, float], ...]:
    """The ``k`` likeliest tokens of one step and their log-probabilities, from its raw logits (~0.2 ms a step for a
    49k vocabulary, on the engine thread, only for entries that asked)."""
    row = np.asarray(logits).reshape(-1)
    peak = float(row.max())
    log_total = peak + float(np.log(np.exp(row - peak).sum(dtype=np.float64)))
    best = np.argpartition(row, -k)[-k:] if k < row.size else np.arange(row.size)
    best = best[np.argsort(-row[best], kind="stable")]
    return tuple((int(i), float(row[i]) - log_total) for i in best)


class _Job:
    """One request: its entries, its consumer's channel, its cancellation flag."""

    def __init__(self, engine: Engine, request: GenerationRequest, channel: Channel):
        self.request = request
        self.channel = channel
        self.cancelled = False
        self.end_ids = set(engine.model.end_token_ids) | set(request.end_token_ids)
        self.constrained = request.constraint is not None
        self.entries = [_Entry(self, i, engine.model) for i in range(request.n)]
        self._unfinished = request.n
        self._count_lock = allocate_native_lock()  # entries may finish on different threads (cancel_all, workers)
        self.enqueued_at = time.monotonic()
        self.planned = False  # the prompt cache's first decision for this request, reported in its usage
        self.cache_read = 0
        self.cache_written = 0

    def note_plan(self, plan: Plan) -> None:
        if not self.planned:
            self.planned = True
            self.cache_read = plan.length if plan.read else 0
            self.cache_written = plan.length if plan.store else 0

    @property
    def sampling_key(self) -> tuple:
        """Requests with equal keys may share a batch (CTranslate2's options are per call)."""
        r = self.request
        sampling = ("greedy",) if r.greedy else (r.temperature, r.top_p, r.top_k)
        # Constrained entries batch only together: their batches copy every step's logits and stop entries to resume.
        return (*sampling, r.repetition_penalty, r.min_tokens, tuple(sorted(self.end_ids)), self.constrained)

    def cancel(self) -> None:
        """Every entry ends ("cancelled") at its next step; waiting ones when a worker reaches them."""
        self.cancelled = True

    def entry_finished(self) -> None:
        with self._count_lock:
            self._unfinished -= 1
            last = self._unfinished == 0
        if last:
            self.channel.put(Done(len(self.request.prompt_ids), sum(e.tokens for e in self.entries),
                                  self.cache_read, self.cache_written))


@dataclass
class _BatchState:
    restart: bool = False
    checked_step: int = -1
    plan: Plan = NO_PLAN  # the cached prefix the batch runs after (or stores)
    generator: object = None  # the generator the plan was made for (a swap may replace the model's meanwhile)
    prefilled: bool = False
    started: float = 0.0  # when the engine call began
    first_step_at: float | None = None  # when its first token came (the prefill's end)
    steps: int = 0  # decoding steps run
    prefill_tokens: int = 0  # tokens the engine call was given beyond the cached prefix
    head: int = 0  # tokens of a head its prompts share, prefilled once for the whole batch (no cached prefix)
    entries: list = None  # the batch's entries, while it runs
    joiners: list = None  # waiting entries that an old batch's restart merges with it directly


# ----------------------------------------------------------------------------- the engine
@dataclass
class BatchingOptions:
    """How the scheduler groups requests into engine batches."""

    max_batch_size: int = 8
    gather_seconds: float = 0.005  # wait this long after the first arrival for companions
    length_tolerance: float = 0.25  # max relative prompt-length difference inside a batch
    max_queue: int = 64  # queued (not yet running) entries beyond which requests are refused
    # A batch this young restarts for waiting requests of similar length; an older one when that saves them more
    # waiting than it costs (0 = never restart)
    join_tokens: int = 16
    max_restarts: int = 2  # per entry, so a stream of arrivals cannot starve a batch
    # Young restarts cost little (a re-prefill of a few tokens more) and arrivals of a burst trickle in over tens of
    # milliseconds: a batch may restart young this many times per entry (each restart takes in at least one entry).
    max_young_restarts: int = 8
    # Greedy output independent of load: only equal prompt lengths share a batch and no batch
    # restarts, the two things that change int8 numerics (measured: equal-length entries of a
    # batch are token-identical to the same prompts alone, on MKL and on oneDNN).
    deterministic: bool = False
    # Prompts of a batch that start with the same tokens (a chat template's default system prompt and the opening of
    # the user's turn: 31 of SmolLM2's 41-45) have that head prefilled once for the batch, when it is at least this
    # long (CTranslate2's static prompt, not kept; 0 = never). Measured: a burst of 16 such prompts prefills in half
    # the time.
    shared_head_tokens: int = 8

    def __post_init__(self) -> None:
        if self.deterministic:
            self.length_tolerance = 0.0
            self.join_tokens = 0
            self.shared_head_tokens = 0  # a split prefill changes int8 numerics: only the request's own split


class Engine:
    """Batches concurrent requests onto CTranslate2 and streams their events to any consumer.

    CTranslate2 cannot add entries to a batch that is already running, so a
    batch that started without a request can never take it in. The scheduler
    therefore runs one native worker per engine replica (the model's
    ``inter_threads``): each worker takes the pending entries, waits a few
    milliseconds for companions, and runs them as one ``generate_batch`` call.
    A new request starts as soon as any worker is idle, never behind a whole
    running batch while another replica is free; with every replica busy it
    waits for the first batch to end. Entries of a batch stop individually
    (end token, stop string, ``max_tokens``, client gone) through the per-entry
    callback. Batches group equal sampling settings and similar prompt lengths
    (the engine prefills only up to the shortest prompt and feeds the rest one
    token per step, which is slower and changes greedy outputs slightly).
    The head that a batch's prompts share (a chat template's default system
    prompt, n choices of one prompt) is prefilled once for the batch.

    Joining a running batch: when requests wait and every replica is busy, a
    running batch that has generated fewer than ``join_tokens`` tokens stops at
    the next step and restarts together with the waiting requests of similar
    length; its entries continue from prompt + generated tokens (one cheap
    re-prefill). Arrivals are shared evenly between the replicas that can take
    them (idle ones and young batches of their kind): a burst whose requests
    trickle in over a few steps ends up as two batches of 8, not one of 13
    beside one of 3 (measured before the sharing). An older batch restarts,
    merged at once with the waiting requests of the same settings whatever their length, when the waiting this
    saves them (each one's wait for the batch to end) exceeds what it costs
    (the engine re-reads every length difference one token per step, and the
    running entries wait for the merged prefill); both timed on the batch
    itself. ``max_restarts`` bounds the restarts of any entry. Greedy outputs of
    restarted entries can differ slightly from an uninterrupted run (the
    re-prefilled tokens are computed in one pass instead of step by step).
    """

    def __init__(self, model: Model, heartbeat_interval: float = 2.0, batching: BatchingOptions | None = None,
                 prompt_cache: PromptCache | None = None):
        self.model = model
        self.heartbeat_interval = heartbeat_interval
        self.batching = batching or BatchingOptions()
        self.prompt_cache = prompt_cache
        self._prefill_seconds_per_token: float | None = None  # measured on batches, for the restart decision
        self._typical_tokens: float | None = None  # completion length, averaged over finished entries (idem)
        self._step_seconds: float | None = None  # one decoding step, averaged over batches (idem, and _long_prefix_pays)
        self._warm: list[list[int]] = []  # conversations to hold in the cache when a replica is idle, newest last
        self._pending: list[_Entry] = []
        self._pending_lock = allocate_native_lock()
        self._wakeup = WorkQueue()  # one token per arrival; workers block on it
        self._seed_lock = allocate_native_lock()
        self._running: set[_Job] = set()
        self._states: list[_BatchState] = []  # the batches running, for sharing arrivals between replicas
        self._idle_workers = 0
        self._batches_running = 0  # workers between taking a batch and finishing it
        self.batch_sizes: list[int] = []  # every batch run, for tests and metrics
        self.shared_head_tokens = 0  # prefill tokens saved by heads shared within a batch (read by the metrics)
        self.resumes = 0  # constrained entries stopped at a forbidden token and continued with an allowed one
        self.restarts = {"young": 0, "merged": 0}  # entries whose batch restarted to take in waiting requests
        self.invariant_violations = 0  # entries ended because their tokens did not continue what was fed
        self._released_at = 0.0  # when idle memory was last given back (_release_when_idle)
        self._closed = False
        self._threads = [NativeThread(self._worker, f"llm-engine-{i}") for i in range(max(1, model.inter_threads))]
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

    def generate(self, request: GenerationRequest) -> EventStream[Event]:
        """Validate, enqueue, and return the event iterator.

        Raises :class:`Overloaded` at once when the queue is full. Closing the
        iterator (client gone → ``GeneratorExit``) cancels the generation
        within a token; the other requests are untouched.
        """
        self.validate(request)
        if self._closed:
            raise EngineShutDown("the engine is shutting down")
        if self.queued + request.n > self.batching.max_queue:
            raise Overloaded(f"{self.queued} completions are already waiting; retry shortly", retry_after=1)
        job = _Job(self, request, Channel())
        with self._pending_lock:
            self._pending.extend(job.entries)
        self._wakeup.put(True)
        return EventStream(self._events(job), cancel=job.cancel)

    def warm(self, ids: list[int]) -> None:
        """Ask an idle replica to hold the state after ``ids`` in the prompt cache (a conversation so far, so that
        its next turn prefills only the new message). Only while another replica stays free for arrivals: a warm-up
        cannot be interrupted once it started."""
        cache = self.prompt_cache
        if cache is None or not cache.enabled or len(self._threads) < 2 or self._closed:
            return
        with self._pending_lock:
            self._warm = [w for w in self._warm if w != ids][-3:] + [list(ids)]
        self._wakeup.put(True)

    def score_continuations(self, prompt_ids: list[int], continuations: list[list[int]]) -> list[float]:
        """Log-probability of each continuation after the prompt (one engine pass, off the event loop).

        Lets a caller choose among a few fixed alternatives (a tool name, say)
        by the model's own likelihood: CTranslate2 has no logits hook to
        constrain sampling.
        """
        if self._closed:
            raise EngineShutDown("the engine is shutting down")
        vocabulary = self.model.vocabulary
        batch = [[vocabulary[t] for t in prompt_ids + list(c)] for c in continuations]
        result = run_on_native_thread(lambda: self.model.generator.score_batch(batch), "llm-engine-score")
        # log_probs[i] scores token i + 1 given the tokens before it.
        first = len(prompt_ids) - 1
        return [sum(r.log_probs[first:]) for r in result]

    def prompt_logprobs(self, prompt_ids: list[int], top: int = 0) -> list[TokenLogprob]:
        """The model's log-probability of each prompt token after the ones before it (the first has none, so the list
        is one shorter than the prompt), with the ``top`` likeliest alternatives at each position; one engine pass
        off the event loop. Alternatives need the whole vocabulary's log-probabilities at every position
        (``forward_batch``: prompt length x vocabulary floats, ~200 KB a token here), so they are computed only
        when asked."""
        if self._closed:
            raise EngineShutDown("the engine is shutting down")
        tokens = [[self.model.vocabulary[t] for t in prompt_ids]]
        generator = self.model.generator
        if not top:
            scores = run_on_native_thread(lambda: generator.score_batch(tokens)[0].log_probs, "llm-engine-score")
            return [TokenLogprob(t, float(lp)) for t, lp in zip(prompt_ids[1:], scores, strict=True)]

        def forward():
            out = generator.forward_batch(tokens, return_log_probs=True)
            if getattr(out, "device", "cpu") != "cpu":
                import ctranslate2

                out = out.to_device(ctranslate2.Device.cpu)
            return np.asarray(out)[0]

        rows = run_on_native_thread(forward, "llm-engine-score")
        return [TokenLogprob(t, float(rows[i, t]), _top_logprobs(rows[i], top)) for i, t in enumerate(prompt_ids[1:])]

    @property
    def alive(self) -> bool:
        return not self._closed and all(t.alive for t in self._threads)

    @property
    def queued(self) -> int:
        """Entries waiting for a batch."""
        return len(self._pending)

    @property
    def running(self) -> int:
        """Requests with at least one entry in a running batch."""
        return len(self._running)

    def cancel_all(self) -> None:
        """End every waiting and running generation now (each stream gets its final events)."""
        for job in list(self._running):
            job.cancelled = True
        with self._pending_lock:
            waiting, self._pending = self._pending, []
        for entry in waiting:
            entry.finish("cancelled")

    def shutdown(self, timeout: float = 10.0) -> bool:
        """Stop taking work, cancel what runs or waits, join the threads. True when all stopped."""
        if self._closed:
            return True
        self._closed = True
        self.cancel_all()
        for _ in self._threads:
            self._wakeup.put(None)
        deadline = time.monotonic() + timeout
        return all(t.join(max(0.0, deadline - time.monotonic())) for t in self._threads)

    # Consumer side ------------------------------------------------------------
    def _events(self, job: _Job) -> Iterator[Event]:
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
    def _set_idle(self, delta: int) -> None:
        with self._pending_lock:
            self._idle_workers += delta

    def _worker(self) -> None:
        while True:
            self._set_idle(+1)
            token = self._wakeup.get()
            self._set_idle(-1)
            if token is None:
                return
            if self.batching.gather_seconds > 0:
                self._gather()
            batch, state = self._take_batch()
            if not batch:
                if state is not None:
                    self._run_warm(state)
                continue
            if self._pending:
                self._wakeup.put(True)  # what did not fit goes to the next idle worker
            while batch:  # a batch, then the merged batch its restart asked for, if any
                batch, state = self._run_batch(batch, state)
            if self._pending:
                self._wakeup.put(True)  # leftovers that did not fit this batch
            else:
                self._release_when_idle()

    def _release_when_idle(self) -> None:
        """When the last batch ends and nothing waits, give freed memory back to the system (glibc keeps the freed
        buffers of the batches in its heap, which the raised mmap threshold makes them come from): an idle worker
        grew by about 100 MB after bursts of vanishing clients otherwise (tests/test_hostile_clients.py, on
        oneDNN). At most once a second: under steady load the heap is reused, not returned."""
        now = time.monotonic()
        with self._pending_lock:
            if self._pending or self._batches_running or now - self._released_at < 1.0:
                return
            self._released_at = now
        release_freed_memory()
        if self._warm:  # a warm-up asked for meanwhile found no other replica free (this one was trimming): retry
            self._wakeup.put(True)

    def _gather(self) -> None:
        """Wait ``gather_seconds`` for companions of the first arrival, and longer while more keep arriving, up to
        what prefilling the waiting requests costs (measured rate; at most ``MAX_GATHER_SECONDS``): a burst's
        requests come in over tens of milliseconds (the HTTP side parses them on the same cores), and a batch that
        starts with the first few restarts for the rest, which throws that prefill away."""
        step = self.batching.gather_seconds
        native_sleep(step)
        waited, seen = step, len(self._pending)
        while True:
            rate, pending = self._prefill_seconds_per_token, self._pending
            if not rate or not pending or len(pending) >= self.batching.max_batch_size:
                return
            if waited + step > min(MAX_GATHER_SECONDS, rate * sum(e.length for e in pending)):
                return
            native_sleep(step)
            waited += step
            if len(self._pending) == seen:
                return  # arrivals stopped
            seen = len(self._pending)

    def _run_batch(self, batch: list[_Entry], state: _BatchState) -> tuple[list[_Entry], _BatchState | None]:
        """Run one batch; returns the merged batch to run next when it restarted for waiting requests that do not
        share its prompt length (else an empty list: survivors of a young batch's restart queue up first)."""
        jobs = {entry.job for entry in batch}
        self._running.update(jobs)
        merged: list[_Entry] = []
        following = None
        try:
            self._run(batch, state)
        except Exception as exc:
            log.exception("generation failed")
            for entry in batch:
                entry.finish("error", error=str(exc))
        finally:
            self._plan_done(state)
            survivors = [e for e in batch if not e.finished and not e.job.cancelled and (state.restart or e.resume)]
            for entry in survivors:
                if entry.resume:  # stopped at a token its grammar forbids: continues with an allowed one
                    entry.resume, entry.resumes = False, entry.resumes + 1
                    self.resumes += 1
                elif not state.joiners:  # a young batch's restart (an older one merges with its joiners)
                    entry.young_restarts += 1
                    self.restarts["young"] += 1
                else:
                    entry.restarts += 1
                    self.restarts["merged"] += 1
            with self._pending_lock:
                if state in self._states:
                    self._states.remove(state)
                if state.joiners and survivors:
                    chosen = set(map(id, state.joiners))
                    joiners = [e for e in self._pending if id(e) in chosen and not e.job.cancelled]
                    self._pending = [e for e in self._pending if id(e) not in chosen or e.job.cancelled]
                    merged = survivors + joiners
                    plan = state.plan
                    following = _BatchState(generator=state.generator, plan=Plan(plan.prefix, False, plan.generation,
                                                                                 plan.keep and state.prefilled))
                    for entry in joiners:
                        entry.job.note_plan(following.plan)
                    following.entries = merged
                    self._states.append(following)
                else:
                    self._pending[:0] = survivors  # first in line for the merged batch
                    self._batches_running -= 1
            for entry in batch:  # an entry the engine ended without a final step
                if entry not in survivors:
                    entry.finish("cancelled" if entry.job.cancelled else "length")
                    if not entry.job.cancelled:
                        typical = self._typical_tokens
                        self._typical_tokens = entry.tokens if typical is None else 0.9 * typical + 0.1 * entry.tokens
            self._running.difference_update(jobs)
            self._release(state)
        if state.first_step_at is not None and state.steps > 4:
            step = (time.monotonic() - state.first_step_at) / state.steps
            self._step_seconds = step if self._step_seconds is None else 0.8 * self._step_seconds + 0.2 * step
        if log.isEnabledFor(logging.DEBUG) and state.started:
            now = time.monotonic()
            log.debug("batch of %d (%d prompt tokens after %d cached, %d of them a shared head): prefill %.3f s, "
                      "%d steps in %.3f s%s", len(batch), state.prefill_tokens, state.plan.length, state.head,
                      (state.first_step_at or now) - state.started, state.steps, now - (state.first_step_at or now),
                      ", restarted" + (f" with {len(state.joiners)} joining" if state.joiners else "")
                      if state.restart else "")
        return merged, following

    def _take_batch(self) -> tuple[list[_Entry], _BatchState | None]:
        """The oldest pending entry plus compatible companions of similar prompt length, and the batch's state
        (with no entries: a state for a warm-up when nothing waits, else None)."""
        with self._pending_lock:
            abandoned = [e for e in self._pending if e.job.cancelled]
            self._pending = [e for e in self._pending if not e.job.cancelled and not e.finished]
            for entry in abandoned:  # clients gone before their turn
                entry.finish("cancelled")
            state = _BatchState(generator=self.model.generator)
            if not self._pending:
                return [], state
            seed = self._pending[0]
            if seed.job.request.seed is not None and not seed.job.request.greedy:
                # a seeded sampled request runs alone, on its own fresh generator
                batch = [e for e in self._pending if e.job is seed.job]
                self._pending = [e for e in self._pending if e.job is not seed.job]
                self._batches_running += 1
                return batch, state
            for seed in self._pending:  # the oldest entry whose cached prefix is not still being computed
                plan = self._plan(seed)
                if plan is not None:
                    break
            else:
                return [], None  # the batches computing their prefixes wake the workers when they are held
            state.plan = plan
            key, length = seed.job.sampling_key, seed.length - plan.length
            candidates = [e for e in self._pending if self._compatible(e, key, length, plan.prefix)]
            candidates.sort(key=lambda e: (abs(e.length - length), e.job.enqueued_at))
            # A burst is shared between the replicas that can take it: two batches of 8 run faster than one of 16
            # beside an idle replica, or beside a young batch of 2 that restarts to take its share.
            batch = candidates[: self._share(len(candidates), lambda e: self._compatible(e, key, length, plan.prefix))]
            if seed not in batch:
                batch[-1:] = [seed]
            chosen = set(map(id, batch))
            self._pending = [e for e in self._pending if id(e) not in chosen]
            self._batches_running += 1
            state.entries = batch  # seen by the other workers' sharing from now on
            self._states.append(state)
            for entry in batch:
                entry.job.note_plan(plan)
        return batch, state

    def _joinable(self, state: _BatchState) -> list[_Entry]:
        """The live entries of a running batch that is young enough to restart for arrivals (else [])."""
        if state.entries is None or state.steps >= self.batching.join_tokens:
            return []
        live = [e for e in state.entries if not e.finished]
        return [] if any(e.young_restarts >= self.batching.max_young_restarts for e in live) else live

    def _share(self, waiting: int, fits, running: _BatchState | None = None) -> int:
        """How many entries a batch should hold so that the replicas able to take ``waiting`` entries share them
        evenly: the idle replicas (``running``: this batch's replica instead) and the young running batches of the
        same kind (``fits`` their entries), which restart to take in theirs. Under the scheduling lock."""
        young = [live for s in self._states if s is not running and (live := self._joinable(s)) and fits(live[0])]
        replicas = (1 if running else max(1, len(self._threads) - self._batches_running)) + len(young)
        load = waiting + sum(map(len, young)) + (len(self._joinable(running)) if running else 0)
        return max(1, min(self.batching.max_batch_size, -(-load // replicas)))

    def _compatible(self, entry: _Entry, key: tuple, length: int, prefix: tuple[int, ...] = ()) -> bool:
        """Same sampling, prompts that start with the batch's cached prefix, and similar lengths after it
        (deterministic mode: a prefill split where this prompt alone would split it)."""
        relative = self.batching.length_tolerance
        tolerance = max(1, int(length * relative)) if relative > 0 else 0
        request = entry.job.request
        if self.batching.deterministic and _split_point(entry) != len(prefix):
            return False
        return (entry.job.sampling_key == key and request.seed is None
                and abs(entry.length - len(prefix) - length) <= tolerance
                and (not prefix or tuple(request.prompt_ids[:len(prefix)]) == prefix))

    # The prompt cache ---------------------------------------------------------
    def _plan(self, entry: _Entry) -> Plan | None:
        """The cache plan for a batch seeded by ``entry`` (None: its prefix is being computed; wait for it).
        Called under the scheduling lock."""
        cache = self.prompt_cache
        request = entry.job.request
        if self.batching.deterministic:  # the prefill is split after the request's longest point, cached or not
            split = _split_point(entry)
            if not split:
                return NO_PLAN
            if cache is None:
                return Plan(tuple(request.prompt_ids[:split]), keep=False)
            plan = cache.plan_at(request.prompt_ids, split)
        elif cache is None or not cache.enabled:
            return NO_PLAN
        else:
            plan = cache.plan(request.prompt_ids + entry.generated, request.cache_points, request.cache_marks)
            if plan is not None and not self._long_prefix_pays(plan.length, entry.length - plan.length):
                cache.retract(plan)
                plan = NO_PLAN
        if cache.swap_wanted:
            self._start_swap()
        return plan

    def _long_prefix_pays(self, prefix: int, rest: int) -> bool:
        """Whether running after a cached prefix longer than the model's sliding window beats prefilling the whole
        prompt. After such a prefix the rest can only be decoded one token per step (see ct2_batch: its
        multi-token forward corrupts the heap), a full decoding step per token: measured on Gemma 3 270M, 60-75 ms
        a token against 1.5 ms prefilled. So it pays for a short rest (a conversation's new message after a
        warm-up), not for a long one. Estimated with this engine's own measured step and prefill times."""
        window = self.model.sliding_window
        if not window or prefix <= window or rest < 2:
            return True
        per_token = self._prefill_seconds_per_token or 0.002
        step = self._step_seconds or 40 * per_token
        return rest * step < (prefix + rest) * per_token

    def _prefilled(self, state: _BatchState, batch: list[_Entry]) -> None:
        """The batch's first step: a prefix it stores is held by the engine from now on; the prefill rate is known."""
        state.prefilled = True
        state.first_step_at = time.monotonic()
        tokens = state.prefill_tokens
        if tokens >= 32 and state.started:
            rate = (state.first_step_at - state.started) / tokens
            previous = self._prefill_seconds_per_token
            self._prefill_seconds_per_token = rate if previous is None else 0.8 * previous + 0.2 * rate
        if state.plan.store:
            with self._pending_lock:
                self.prompt_cache.ready(state.plan)
            self._wakeup.put(True)  # requests waiting for that prefix

    def _plan_done(self, state: _BatchState) -> None:
        if state.plan.store and not state.prefilled:
            with self._pending_lock:
                self.prompt_cache.forget(state.plan)
            self._wakeup.put(True)

    def _release(self, state: _BatchState) -> None:
        """Drop the batch's generator; the last batch of a swapped-out one frees its states and weights."""
        old = state.generator is not None and state.generator is not self.model.generator
        state.generator = None
        if old:
            release_freed_memory()

    def _run_warm(self, state: _BatchState) -> None:
        """Hold the newest requested conversation in the cache, when no request waits and another replica is
        free for arrivals."""
        with self._pending_lock:
            if self._pending or not self._warm or self._idle_workers < 1 or self._closed:
                return
            ids = self._warm.pop()
            state.plan = self.prompt_cache.warm_plan(ids)
            if self.prompt_cache.swap_wanted:
                self._start_swap()
            if not state.plan.store:
                return
            self._batches_running += 1
        try:
            ct2_batch.hold(state.generator, self.model.vocabulary, ids)
            state.prefilled = True
            with self._pending_lock:
                self.prompt_cache.ready(state.plan)
        except Exception:
            log.exception("prompt cache warm-up failed")
        finally:
            self._plan_done(state)
            with self._pending_lock:
                self._batches_running -= 1
            self._release(state)
        if self._pending or self._warm:
            self._wakeup.put(True)

    def _start_swap(self) -> None:
        """Load a fresh generator (empty cache) in the background; swapped in between batches. Under the lock."""
        cache = self.prompt_cache
        cache.swap_wanted = False
        if cache.swapping or self._closed:
            return
        cache.swapping = True
        NativeThread(self._swap, "llm-engine-swap").start()

    def _swap(self) -> None:
        cache = self.prompt_cache
        started = time.monotonic()
        try:
            fresh = self.model.new_generator()
        except Exception:
            log.exception("prompt cache: cannot load a fresh generator; the cache stays full")
            with self._pending_lock:
                cache.swapping = False
            return
        with self._pending_lock:
            keep = cache.survivors()
            freed = cache.held_bytes
            self.model.generator = fresh
            cache.swapped()
            self._warm = [list(k) for k in reversed(keep)] + self._warm
        release_freed_memory()  # the old generator is gone unless a batch still runs on it (that batch's end frees it)
        log.info("prompt cache full: swapped in a fresh generator in %.2f s (%.0f MB of held states go with the old "
                 "one; %d recent prefixes to hold again)", time.monotonic() - started, freed / 2**20, len(keep))
        self._wakeup.put(True)

    def _should_restart(self, batch: list[_Entry], state: _BatchState, step) -> bool:
        """Checked once per decoding step while requests wait and no replica is free: restart the batch to take them
        in? A young batch (``join_tokens``) restarts for requests of similar length, which then queue with it. An
        older one restarts when the wait it saves the newcomers is longer than what it costs (see
        :meth:`_worth_merging`); it then runs again at once, merged with them."""
        if state.restart:
            return True
        if step.step == state.checked_step or not self._pending or not self.batching.join_tokens:
            return False
        state.checked_step = step.step
        live = [e for e in batch if not e.finished]
        if not live:
            return False
        prefix = state.plan.prefix
        key, length = live[0].job.sampling_key, live[0].length - len(prefix)
        room = self.batching.max_batch_size - len(live)
        with self._pending_lock:
            if self._idle_workers:
                return False  # an idle replica will take them
            if self._joinable(state):
                # Young: restart when this batch holds less than its share of the arrivals of its kind (the other
                # young batches restart for theirs); its entries queue with them.
                def fits(entry):
                    return self._compatible(entry, key, length, prefix)

                if any(s.restart for s in self._states if s is not state):
                    return False  # another batch is taking arrivals in; what it leaves is shared at the next step
                joiners = [e for e in self._pending if fits(e)]
                state.restart = bool(joiners) and len(live) < self._share(len(joiners), fits, running=state)
                return state.restart
            if step.step < self.batching.join_tokens or any(e.restarts >= self.batching.max_restarts for e in live):
                return False
            joiners = [e for e in self._pending if e.job.sampling_key == key and e.job.request.seed is None
                       and (not prefix or tuple(e.job.request.prompt_ids[:len(prefix)]) == prefix)][:room]
        if joiners and self._worth_merging(live, joiners, state, step):
            state.restart, state.joiners = True, joiners
        return state.restart

    def _worth_merging(self, live: list[_Entry], joiners: list[_Entry], state: _BatchState, step) -> bool:
        """Whether restarting an older batch with ``joiners`` saves more entry-steps of waiting than it costs.

        Saved: each newcomer's wait for this batch to end (its longest remaining budget). Cost: CTranslate2 prefills
        a batch only up to its shortest prompt and feeds the rest one token per step, so each entry re-reads the
        tokens beyond the shortest one step at a time before it writes again; and every running entry waits for the
        merged batch's prefill (timed: this batch's own prefill rate and step time)."""
        if state.first_step_at is None or step.step <= 0:
            return False
        now = time.monotonic()
        step_seconds = (now - state.first_step_at) / step.step
        cut = state.plan.length
        old = [e.length - cut for e in live]
        new = [e.length - cut for e in joiners]
        shortest = min(old + new)
        rereading = sum(n - shortest for n in old + new)
        prefill_steps = 0.0
        if self._prefill_seconds_per_token and step_seconds > 0:
            prefill_steps = shortest * len(old + new) * self._prefill_seconds_per_token / step_seconds
        # A batch ends with its longest entry: its budget, or what completions usually take when most end earlier.
        typical = self._typical_tokens

        def expected_length(request: GenerationRequest) -> float:
            return min(request.max_tokens, max(request.min_tokens, 2 * typical)) if typical else request.max_tokens

        remaining = max(expected_length(e.job.request) - e.tokens for e in live)
        return len(joiners) * remaining > rereading + prefill_steps * len(live)

    def _run(self, batch: list[_Entry], state: _BatchState) -> None:
        first = batch[0].job.request
        seeded = first.seed is not None and not first.greedy
        rows = [e.job.request.prompt_ids + e.generated for e in batch]
        static, keep = state.plan.length, state.plan.keep
        if not static and len(rows) > 1 and self.batching.shared_head_tokens:
            # CTranslate2 computes a static prompt once (batch of one) and copies its state to every entry. The
            # head leaves two tokens of the shortest row (a single one would make CTranslate2 echo the longer rows'
            # rests), and stays within a sliding window (longer ones are only safe decoded one token at a time).
            head = min(len(os.path.commonprefix(rows)), min(map(len, rows)) - 2)
            if self.model.sliding_window:
                head = min(head, self.model.sliding_window)
            if head >= self.batching.shared_head_tokens:
                static, keep, state.head = head, False, head
                self.shared_head_tokens += head * (len(rows) - 1)
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
                self._prefilled(state, batch)
            state.steps = step.step + 1
            return batch[i].on_step(step, row) or (not seeded and self._should_restart(batch, state, step))

        def on_violation(i: int, problem: str) -> None:
            self.invariant_violations += 1
            log.error("generation invariant broken, entry ended: %s", problem)
            batch[i].finish("error", error="internal error: the engine lost track of this completion's tokens")

        self.batch_sizes.append(len(batch))
        state.prefill_tokens = sum(len(r) - static for r in rows) + state.head
        state.started = time.monotonic()
        if seeded:
            self._run_seeded(batch[0].job, call, on_token, on_violation)
        else:
            ct2_batch.run(state.generator, self.model.vocabulary, call, on_token, on_violation)

    def _run_seeded(self, job: _Job, call: ct2_batch.BatchCall, on_token, on_violation) -> None:
        """CTranslate2's RNG is per native thread and seeded once, from a global
        seed, at its first use. A reproducible sampled completion therefore runs
        on a fresh generator (new threads) created after setting the seed; the
        seed lock is held until the first token has been sampled. A run that
        continues the completion (a constrained resume) is seeded anew from the
        request's seed and the tokens so far, so it neither repeats the first
        run's random draws nor depends on anything but the request."""
        import ctranslate2

        model = self.model
        self._seed_lock.acquire()
        released = [False]

        def release() -> None:
            if not released[0]:
                released[0] = True
                ctranslate2.set_random_seed(DEFAULT_SEED)
                self._seed_lock.release()

        def first_then_on_token(i, step, row):
            release()
            return on_token(i, step, row)

        try:
            generated = sum(len(e.generated) for e in job.entries)
            ctranslate2.set_random_seed((job.request.seed + 7919 * generated) % DEFAULT_SEED)
            generator = ctranslate2.Generator(
                model.path, device=model.device, compute_type=model.compute_type,
                inter_threads=1, intra_threads=model.intra_threads,
            )
            ct2_batch.run(generator, model.vocabulary, call, first_then_on_token, on_violation)
            del generator
        finally:
            release()
