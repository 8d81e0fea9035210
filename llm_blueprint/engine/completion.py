"""One request and its completions (entries), token by token: what a batch's per-token callback does for each.

A :class:`Job` is one request: its entries, its consumer's channel, its
cancellation flag. An :class:`Entry` is one completion of it, one row of an
engine batch: it decodes its tokens incrementally, matches stop strings,
applies a constraint (replacing a forbidden token and stopping so that it
resumes), counts, and puts the finished text on the channel. Everything here
runs on the engine's native threads, inside CTranslate2's callback; nothing
here knows of batches, replicas or CTranslate2 itself.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ..events import Done, Finish, GenerationRequest, Planned, TextDelta, TokenLogprob
from .constraints import TokenMatcher, vocabulary_for
from .handoff import Channel, allocate_native_lock
from .model import Model
from .prompt_cache import Plan
from .text_stream import IncrementalDecoder, StopMatcher

log = logging.getLogger(__name__)

CLOSING_TOKENS = 32  # a JSON constraint closes its value in at most this many last tokens of the budget


class Entry:
    """One completion of a request: one batch entry. Touched only on engine threads."""

    def __init__(self, job: Job, index: int, model: Model):
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
        top = top_logprobs(logits, request.top_logprobs) if request.logprobs and request.top_logprobs else ()
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


def split_point(entry: Entry) -> int:
    """Deterministic mode: where a prompt's prefill is split, whatever the cache holds (its longest cache point)."""
    request = entry.job.request
    points = [p for p in (*request.cache_points, *request.cache_marks) if 0 < p < len(request.prompt_ids)]
    return max(points, default=0)


def top_logprobs(logits, k: int) -> tuple[tuple[int, float], ...]:
    """The ``k`` likeliest tokens of one step and their log-probabilities, from its raw logits (~0.2 ms a step for a
    49k vocabulary, on the engine thread, only for entries that asked)."""
    row = np.asarray(logits).reshape(-1)
    peak = float(row.max())
    log_total = peak + float(np.log(np.exp(row - peak).sum(dtype=np.float64)))
    best = np.argpartition(row, -k)[-k:] if k < row.size else np.arange(row.size)
    best = best[np.argsort(-row[best], kind="stable")]
    return tuple((int(i), float(row[i]) - log_total) for i in best)


class Job:
    """One request: its entries, its consumer's channel, its cancellation flag."""

    def __init__(self, model: Model, request: GenerationRequest, channel: Channel):
        self.request = request
        self.channel = channel
        self.cancelled = False
        self.end_ids = set(model.end_token_ids) | set(request.end_token_ids)
        self.constrained = request.constraint is not None
        self.entries = [Entry(self, i, model) for i in range(request.n)]
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
            self.channel.put(Planned(self.cache_read, self.cache_written))

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
