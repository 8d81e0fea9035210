"""The protocol-neutral generation pipeline: a request in, a stream of events out.

Every HTTP API builds a :class:`GenerationRequest`, calls
:meth:`Engine.generate` and formats the events it yields. The engine knows
nothing of HTTP; the routes know nothing of CTranslate2.

Token processing (incremental decoding, stop strings, counting) runs inside
CTranslate2's per-token callback on the engine's native thread, so a
completion stops the moment a stop string appears; the consumer only
receives finished events.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import ContextTooLong, EngineShutDown, InvalidRequest
from .handoff import Channel, Empty, NativeThread, WorkQueue, allocate_native_lock
from .model import Model
from .text_stream import IncrementalDecoder, StopMatcher

log = logging.getLogger(__name__)

DEFAULT_SEED = 2**32 - 1  # CTranslate2's "no seed": random_device on next use


# ----------------------------------------------------------------------------- requests and events
@dataclass
class GenerationRequest:
    """What to generate, independent of any wire protocol."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    end_token_ids: list[int] = field(default_factory=list)
    n: int = 1
    seed: int | None = None
    logprobs: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class TextDelta:
    """New text of completion ``index``; ``logprobs`` covers the tokens that produced it."""

    index: int
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finish:
    """Completion ``index`` ended. ``reason``: stop, length, stop_sequence, cancelled, error."""

    index: int
    reason: str
    completion_tokens: int
    stop_sequence: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Done:
    """The whole request ended; exact token counts over all completions."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Heartbeat:
    """Nothing new for a while; lets a stream write a keep-alive."""


Event = TextDelta | Finish | Done | Heartbeat


# ----------------------------------------------------------------------------- one running request
class _Completion:
    """Per-completion state, touched only on the engine thread."""

    def __init__(self, index: int, model: Model, request: GenerationRequest, end_ids: set[int]):
        self.index = index
        self.decoder = IncrementalDecoder(model.tokenizer, request.prompt_ids)
        self.stops = StopMatcher(request.stop)
        self.end_ids = end_ids
        self.tokens = 0
        self.finished = False
        self.pending_logprobs: list[TokenLogprob] = []
        self.want_logprobs = request.logprobs


class _Job:
    def __init__(self, engine: Engine, request: GenerationRequest, channel: Channel):
        self.request = request
        self.channel = channel
        self.cancelled = False
        end_ids = set(engine.model.end_token_ids) | set(request.end_token_ids)
        self.completions = [_Completion(i, engine.model, request, end_ids) for i in range(request.n)]
        self.first_token_seen = False
        self.on_first_token = None

    # Runs on the engine thread, once per generated token of each batch entry.
    def on_step(self, step) -> bool:
        if self.on_first_token is not None:
            callback, self.on_first_token = self.on_first_token, None
            callback()
        completion = self.completions[step.batch_id]
        if completion.finished:
            return True
        if self.cancelled:
            self._finish(completion, "cancelled")
            return True
        try:
            return self._accept(completion, step)
        except Exception as exc:  # never let an exception escape into C++
            log.exception("token processing failed")
            self._finish(completion, "error", error=str(exc))
            return True

    def _accept(self, completion: _Completion, step) -> bool:
        token_id = step.token_id
        if step.is_last and token_id in completion.end_ids:
            self._emit(completion, completion.decoder.flush())
            self._emit(completion, completion.stops.flush())
            self._finish(completion, "stop")
            return True
        completion.tokens += 1
        if completion.want_logprobs:
            completion.pending_logprobs.append(TokenLogprob(token_id, float(step.log_prob or 0.0)))
        text = completion.decoder.push(token_id)
        if step.is_last:
            text += completion.decoder.flush()
        if text:
            visible, matched = completion.stops.feed(text)
            self._emit(completion, visible)
            if matched is not None:
                self._finish(completion, "stop_sequence", stop_sequence=matched)
                return True
        if step.is_last or completion.tokens >= self.request.max_tokens:
            self._emit(completion, completion.stops.flush())
            self._finish(completion, "length")
            return True
        return False

    def _emit(self, completion: _Completion, text: str) -> None:
        if text:
            logprobs, completion.pending_logprobs = tuple(completion.pending_logprobs), []
            self.channel.put(TextDelta(completion.index, text, logprobs))

    def _finish(self, completion: _Completion, reason: str, stop_sequence: str | None = None, error: str | None = None) -> None:
        if not completion.finished:
            completion.finished = True
            self.channel.put(Finish(completion.index, reason, completion.tokens, stop_sequence, error))

    def finish_all(self, reason: str, error: str | None = None) -> None:
        for completion in self.completions:
            if not completion.finished:
                if reason in ("stop", "length"):
                    self._emit(completion, completion.decoder.flush())
                    self._emit(completion, completion.stops.flush())
                self._finish(completion, reason, error=error)
        self.channel.put(Done(len(self.request.prompt_ids), sum(c.tokens for c in self.completions)))


# ----------------------------------------------------------------------------- the engine
class Engine:
    """Runs generations on native threads and streams their events to any consumer.

    One native thread per CTranslate2 replica (the model's ``inter_threads``)
    runs one request at a time: all of its ``n`` completions as one batch,
    each entry stopping on its own.
    """

    def __init__(self, model: Model, heartbeat_interval: float = 2.0):
        self.model = model
        self.heartbeat_interval = heartbeat_interval
        self._queue = WorkQueue()
        self._seed_lock = allocate_native_lock()
        self._running: set[_Job] = set()
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
        if len(request.prompt_ids) + request.max_tokens > self.model.context_length:
            raise ContextTooLong(len(request.prompt_ids), request.max_tokens, self.model.context_length)

    def generate(self, request: GenerationRequest) -> Iterator[Event]:
        """Validate, enqueue, and return the event iterator.

        Closing the iterator (client gone → ``GeneratorExit``) cancels the
        generation within a token; the other requests are untouched.
        """
        self.validate(request)
        if self._closed:
            raise EngineShutDown("the engine is shutting down")
        job = _Job(self, request, Channel())
        self._queue.put(job)
        return self._events(job)

    @property
    def alive(self) -> bool:
        return not self._closed and all(t.alive for t in self._threads)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> int:
        return len(self._running)

    def shutdown(self, timeout: float = 10.0) -> bool:
        """Stop taking work, cancel what runs, join the threads. True when all stopped."""
        if self._closed:
            return True
        self._closed = True
        for job in list(self._running):
            job.cancelled = True
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        stopped = all(t.join(max(0.0, deadline - time.monotonic())) for t in self._threads)
        return stopped

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
    def _worker(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled or self._closed:
                job.finish_all("cancelled")
                continue
            self._running.add(job)
            try:
                self._run(job)
                job.finish_all("cancelled" if job.cancelled else "length")
            except Exception as exc:
                log.exception("generation failed")
                job.finish_all("error", error=str(exc))
            finally:
                self._running.discard(job)

    def _run(self, job: _Job) -> None:
        request = job.request
        model = self.model
        tokens = model.tokenizer.ids_to_tokens(request.prompt_ids)
        options = dict(
            max_length=request.max_tokens,
            include_prompt_in_result=False,
            end_token=model.tokenizer.ids_to_tokens(sorted(job.completions[0].end_ids)),
            repetition_penalty=request.repetition_penalty,
            return_scores=request.logprobs,
            callback=job.on_step,
        )
        if request.greedy:
            options.update(sampling_topk=1)
        else:
            options.update(
                sampling_topk=request.top_k if request.top_k > 1 else 0,
                sampling_topp=request.top_p,
                sampling_temperature=request.temperature,
            )
        batch = [tokens] * request.n
        if request.seed is None or request.greedy:
            model.generator.generate_batch(batch, **options)
            return
        self._run_seeded(job, batch, options)

    def _run_seeded(self, job: _Job, batch, options) -> None:
        """CTranslate2's RNG is per native thread and seeded once, from a global
        seed, at its first use. A reproducible sampled completion therefore runs
        on a fresh generator (new threads) created after setting the seed; the
        seed lock is held until the first token has been sampled."""
        import ctranslate2

        model = self.model
        self._seed_lock.acquire()
        released = [False]

        def release() -> None:
            if not released[0]:
                released[0] = True
                ctranslate2.set_random_seed(DEFAULT_SEED)
                self._seed_lock.release()

        try:
            ctranslate2.set_random_seed(job.request.seed % DEFAULT_SEED)
            generator = ctranslate2.Generator(
                model.path, device=model.device, compute_type=model.compute_type,
                inter_threads=1, intra_threads=model.intra_threads,
            )
            job.on_first_token = release
            generator.generate_batch(batch, **options)
            del generator
        finally:
            release()


def collect(events: Iterator[Event], n: int) -> tuple[list[str], list[Finish], Done, list[list[TokenLogprob]]]:
    """Drain an event stream into texts, finishes, totals and logprobs (non-streaming responses)."""
    texts = [[] for _ in range(n)]
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
    finishes: list[Finish | None] = [None] * n
    done = None
    for event in events:
        if isinstance(event, TextDelta):
            texts[event.index].append(event.text)
            logprobs[event.index].extend(event.logprobs)
        elif isinstance(event, Finish):
            finishes[event.index] = event
        elif isinstance(event, Done):
            done = event
    return ["".join(t) for t in texts], finishes, done, logprobs

