"""The scheduling policy: which waiting entries run together next, who joins a running batch, when a batch restarts.

The :class:`Scheduler` owns the queue of entries waiting for a batch, the
batches running (their :class:`BatchState`), the lock that guards both, and
the timings measured on past batches that its decisions use. It decides; it
never runs anything: the engine's workers take batches from it, run them (the
only call into CTranslate2 is ``ct2_batch.run``), and hand them back to
:meth:`Scheduler.settle` when they end. It knows nothing of CTranslate2, so the
policy is tested with a fake runner (tests/test_scheduler.py).

CTranslate2 cannot add entries to a batch that is already running, so a
batch that started without a request can never take it in. The engine
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

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ..events import GenerationRequest
from .completion import Entry, split_point
from .handoff import WorkQueue, allocate_native_lock, native_sleep
from .prompt_cache import NO_PLAN, Plan

MAX_GATHER_SECONDS = 0.1  # a burst is gathered while it keeps arriving, never longer than this


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

@dataclass
class BatchState:
    """One running batch (or warm-up), as the scheduler and the cache planner see it."""

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




class Scheduler:
    """The waiting entries, the running batches and the policy over them. Every method that reads or changes the
    queue or the running batches takes ``lock`` (the scheduling lock), except where it says the caller holds it."""

    def __init__(self, options: BatchingOptions, replicas: int,
                 plan: Callable[[Entry], Plan | None] | None = None):
        self.options = options
        self.replicas = replicas
        # The cached prefix a batch seeded by an entry runs after (None: being computed, wait); the cache planner's.
        self.plan: Callable[[Entry], Plan | None] = plan or (lambda entry: NO_PLAN)
        # How many of a batch's entries (its seed first) the worker's memory lets it hold (the engine's; default all)
        self.rows_that_fit: Callable[[list[Entry], Plan], int] = lambda entries, plan: len(entries)
        self.pending: list[Entry] = []
        self.lock = allocate_native_lock()
        self.wakeup = WorkQueue()  # one token per arrival; idle workers block on it
        self.states: list[BatchState] = []  # the batches running, for sharing arrivals between replicas
        self.idle_workers = 0
        self.batches_running = 0  # workers between taking a batch and settling it
        # Measured on past batches, for the restart, gathering and cache decisions:
        self.prefill_seconds_per_token: float | None = None
        self.step_seconds: float | None = None  # one decoding step
        self.typical_tokens: float | None = None  # completion length, averaged over finished entries
        self.restarts = {"young": 0, "merged": 0}  # entries whose batch restarted to take in waiting requests
        self.resumes = 0  # constrained entries stopped at a forbidden token and continued with an allowed one

    def submit(self, entries: list[Entry]) -> None:
        with self.lock:
            self.pending.extend(entries)
        self.wakeup.put(True)

    def set_idle(self, delta: int) -> None:
        with self.lock:
            self.idle_workers += delta

    def drain(self) -> list[Entry]:
        """Take every waiting entry out of the queue (to cancel them)."""
        with self.lock:
            waiting, self.pending = self.pending, []
        return waiting

    def gather(self) -> None:
        """Wait ``gather_seconds`` for companions of the first arrival, and longer while more keep arriving, up to
        what prefilling the waiting requests costs (measured rate; at most ``MAX_GATHER_SECONDS``): a burst's
        requests come in over tens of milliseconds (the HTTP side parses them on the same cores), and a batch that
        starts with the first few restarts for the rest, which throws that prefill away."""
        step = self.options.gather_seconds
        native_sleep(step)
        waited, seen = step, len(self.pending)
        while True:
            rate, pending = self.prefill_seconds_per_token, self.pending
            if not rate or not pending or len(pending) >= self.options.max_batch_size:
                return
            if waited + step > min(MAX_GATHER_SECONDS, rate * sum(e.length for e in pending)):
                return
            native_sleep(step)
            waited += step
            if len(self.pending) == seen:
                return  # arrivals stopped
            seen = len(self.pending)

    def take_batch(self, generator) -> tuple[list[Entry], BatchState | None]:
        """The oldest pending entry plus compatible companions of similar prompt length, and the batch's state
        (with no entries: a state for a warm-up when nothing waits, else None)."""
        with self.lock:
            abandoned = [e for e in self.pending if e.job.cancelled]
            self.pending = [e for e in self.pending if not e.job.cancelled and not e.finished]
            for entry in abandoned:  # clients gone before their turn
                entry.finish("cancelled")
            state = BatchState(generator=generator)
            if not self.pending:
                return [], state
            seed = self.pending[0]
            if seed.job.request.seed is not None and not seed.job.request.greedy:
                # a seeded sampled request runs alone, on its own fresh generator
                batch = [e for e in self.pending if e.job is seed.job]
                self.pending = [e for e in self.pending if e.job is not seed.job]
                self.batches_running += 1
                return batch, state
            for seed in self.pending:  # the oldest entry whose cached prefix is not still being computed
                plan = self.plan(seed)
                if plan is not None:
                    break
            else:
                return [], None  # the batches computing their prefixes wake the workers when they are held
            state.plan = plan
            key, length = seed.job.sampling_key, seed.length - plan.length
            candidates = [e for e in self.pending if self.compatible(e, key, length, plan.prefix)]
            candidates.sort(key=lambda e: (abs(e.length - length), e.job.enqueued_at))
            # A burst is shared between the replicas that can take it: two batches of 8 run faster than one of 16
            # beside an idle replica, or beside a young batch of 2 that restarts to take its share.
            batch = candidates[: self.share(len(candidates), lambda e: self.compatible(e, key, length, plan.prefix))]
            if seed not in batch:
                batch[-1:] = [seed]
            if len(batch) > 1:  # the seed first, then the closest lengths, as many as the memory holds
                batch = [seed] + [e for e in batch if e is not seed]
                batch = batch[: self.rows_that_fit(batch, plan)]
            chosen = set(map(id, batch))
            self.pending = [e for e in self.pending if id(e) not in chosen]
            self.batches_running += 1
            state.entries = batch  # seen by the other workers' sharing from now on
            self.states.append(state)
            for entry in batch:
                entry.job.note_plan(plan)
        return batch, state

    def joinable(self, state: BatchState) -> list[Entry]:
        """The live entries of a running batch that is young enough to restart for arrivals (else [])."""
        if state.entries is None or state.steps >= self.options.join_tokens:
            return []
        live = [e for e in state.entries if not e.finished]
        return [] if any(e.young_restarts >= self.options.max_young_restarts for e in live) else live

    def share(self, waiting: int, fits, running: BatchState | None = None) -> int:
        """How many entries a batch should hold so that the replicas able to take ``waiting`` entries share them
        evenly: the idle replicas (``running``: this batch's replica instead) and the young running batches of the
        same kind (``fits`` their entries), which restart to take in theirs. Under the scheduling lock."""
        young = [live for s in self.states if s is not running and (live := self.joinable(s)) and fits(live[0])]
        replicas = (1 if running else max(1, self.replicas - self.batches_running)) + len(young)
        load = waiting + sum(map(len, young)) + (len(self.joinable(running)) if running else 0)
        return max(1, min(self.options.max_batch_size, -(-load // replicas)))

    def compatible(self, entry: Entry, key: tuple, length: int, prefix: tuple[int, ...] = ()) -> bool:
        """Same sampling, prompts that start with the batch's cached prefix, and similar lengths after it
        (deterministic mode: a prefill split where this prompt alone would split it)."""
        relative = self.options.length_tolerance
        tolerance = max(1, int(length * relative)) if relative > 0 else 0
        request = entry.job.request
        if self.options.deterministic and split_point(entry) != len(prefix):
            return False
        return (entry.job.sampling_key == key and request.seed is None
                and abs(entry.length - len(prefix) - length) <= tolerance
                and (not prefix or tuple(request.prompt_ids[:len(prefix)]) == prefix))

    def should_restart(self, batch: list[Entry], state: BatchState, step) -> bool:
        """Checked once per decoding step while requests wait and no replica is free: restart the batch to take them
        in? A young batch (``join_tokens``) restarts for requests of similar length, which then queue with it. An
        older one restarts when the wait it saves the newcomers is longer than what it costs (see
        :meth:`_worth_merging`); it then runs again at once, merged with them."""
        if state.restart:
            return True
        if step.step == state.checked_step or not self.pending or not self.options.join_tokens:
            return False
        state.checked_step = step.step
        live = [e for e in batch if not e.finished]
        if not live:
            return False
        prefix = state.plan.prefix
        key, length = live[0].job.sampling_key, live[0].length - len(prefix)
        room = self.options.max_batch_size - len(live)
        with self.lock:
            if self.idle_workers:
                return False  # an idle replica will take them
            if self.joinable(state):
                # Young: restart when this batch holds less than its share of the arrivals of its kind (the other
                # young batches restart for theirs); its entries queue with them.
                def fits(entry):
                    return self.compatible(entry, key, length, prefix)

                if any(s.restart for s in self.states if s is not state):
                    return False  # another batch is taking arrivals in; what it leaves is shared at the next step
                joiners = [e for e in self.pending if fits(e)]
                state.restart = bool(joiners) and len(live) < self.share(len(joiners), fits, running=state)
                return state.restart
            if step.step < self.options.join_tokens or any(e.restarts >= self.options.max_restarts for e in live):
                return False
            joiners = [e for e in self.pending if e.job.sampling_key == key and e.job.request.seed is None
                       and (not prefix or tuple(e.job.request.prompt_ids[:len(prefix)]) == prefix)][:room]
        if joiners and self.worth_merging(live, joiners, state, step):
            state.restart, state.joiners = True, joiners
        return state.restart

    def worth_merging(self, live: list[Entry], joiners: list[Entry], state: BatchState, step) -> bool:
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
        if self.prefill_seconds_per_token and step_seconds > 0:
            prefill_steps = shortest * len(old + new) * self.prefill_seconds_per_token / step_seconds
        # A batch ends with its longest entry: its budget, or what completions usually take when most end earlier.
        typical = self.typical_tokens

        def expected_length(request: GenerationRequest) -> float:
            return min(request.max_tokens, max(request.min_tokens, 2 * typical)) if typical else request.max_tokens

        remaining = max(expected_length(e.job.request) - e.tokens for e in live)
        return len(joiners) * remaining > rereading + prefill_steps * len(live)

    # A batch's end ------------------------------------------------------------
    def settle(self, batch: list[Entry], state: BatchState) -> tuple[list[Entry], list[Entry], BatchState | None]:
        """A batch ended (its engine call returned or failed). Its entries that must go on (a restart, a constrained
        resume) either queue first in line or, when an older batch restarted for joiners, form the merged batch to
        run next on the same worker. Returns (those survivors, the merged batch or [], its state or None)."""
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
        merged: list[Entry] = []
        following = None
        with self.lock:
            if state in self.states:
                self.states.remove(state)
            if state.joiners and survivors:
                chosen = set(map(id, state.joiners))
                joiners = [e for e in self.pending if id(e) in chosen and not e.job.cancelled]
                self.pending = [e for e in self.pending if id(e) not in chosen or e.job.cancelled]
                merged = survivors + joiners
                plan = state.plan
                following = BatchState(generator=state.generator, plan=Plan(plan.prefix, False, plan.generation,
                                                                            plan.keep and state.prefilled))
                for entry in joiners:
                    entry.job.note_plan(following.plan)
                following.entries = merged
                self.states.append(following)
            else:
                self.pending[:0] = survivors  # first in line for the merged batch
                self.batches_running -= 1
        return survivors, merged, following

    def note_finished(self, entry: Entry) -> None:
        """An entry that ran to its end: its length feeds the typical completion length."""
        typical = self.typical_tokens
        self.typical_tokens = entry.tokens if typical is None else 0.9 * typical + 0.1 * entry.tokens

    def note_prefill(self, state: BatchState) -> None:
        """The batch's first token came: its prefill rate, when it prefilled enough tokens to tell."""
        tokens = state.prefill_tokens
        if tokens >= 32 and state.started and state.first_step_at is not None:
            rate = (state.first_step_at - state.started) / tokens
            previous = self.prefill_seconds_per_token
            self.prefill_seconds_per_token = rate if previous is None else 0.8 * previous + 0.2 * rate

    def note_steps(self, state: BatchState) -> None:
        """The batch ended: its decoding step time."""
        if state.first_step_at is not None and state.steps > 4:
            step = (time.monotonic() - state.first_step_at) / state.steps
            self.step_seconds = step if self.step_seconds is None else 0.8 * self.step_seconds + 0.2 * step
