"""Prometheus metrics (``prometheus_client``), multiprocess-safe under several gunicorn workers.

With ``PROMETHEUS_MULTIPROC_DIR`` set (``gunicorn.conf.py`` does it), every
worker writes its values to files there and ``/metrics`` aggregates them.
Metrics are only ever touched from request greenlets/threads, never from the
engine's native threads.
"""

from __future__ import annotations

import os
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as _multiprocess

from .engine.generation import Engine
from .events import Done, Event, EventStream, TextDelta

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter("llm_requests_total", "API requests by route and status", ["route", "status"])
TOKENS = Counter("llm_tokens_total", "Tokens processed, by direction (prompt, completion)", ["direction"])
TIME_TO_FIRST_TOKEN = Histogram("llm_time_to_first_token_seconds", "From request to first generated text", buckets=LATENCY_BUCKETS)
DURATION = Histogram("llm_request_duration_seconds", "From request to the end of its response", ["route"], buckets=LATENCY_BUCKETS)
QUEUE_DEPTH = Gauge("llm_queue_depth", "Completions waiting for an engine batch", multiprocess_mode="livesum")
IN_FLIGHT = Gauge("llm_in_flight_requests", "Generations queued or running", multiprocess_mode="livesum")
BATCH_SIZE = Histogram("llm_batch_size", "Completions per engine batch", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
REJECTIONS = Counter("llm_rejections_total", "Requests refused before generation, by reason", ["reason"])
RATE_LIMIT_UNCHECKED = Counter("llm_rate_limit_unchecked_total",
                               "Requests whose rate limit could not be checked (its storage failed), by what was done: "
                               "admitted (fail open) or refused (fail closed)", ["action"])

# Embedding and rerank models, one series per served model id.
ENCODER_INPUTS = Counter("llm_encoder_inputs_total", "Inputs embedded or ranked, by model and kind", ["model", "kind"])
ENCODER_TOKENS = Counter("llm_encoder_tokens_total", "Tokens read by embedding and rerank models, by model", ["model"])
ENCODER_DURATION = Histogram("llm_encoder_request_seconds", "Embedding/rerank engine time per request (queue included), "
                             "by model", ["model"], buckets=LATENCY_BUCKETS)
ENCODER_BATCH_SIZE = Histogram("llm_encoder_batch_size", "Inputs per embedding/rerank forward pass, by model", ["model"],
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128))
ENCODER_QUEUE = Gauge("llm_encoder_queue_depth", "Embedding/rerank inputs waiting for a forward pass, by model", ["model"],
                      multiprocess_mode="livesum")


def observe_encoder(model_id: str, kind: str, engine, inputs: int, tokens: int, seconds: float) -> None:
    """One embedding or rerank request's counts; the engine's new forward passes into the batch size histogram."""
    ENCODER_INPUTS.labels(model_id, kind).inc(inputs)
    ENCODER_TOKENS.labels(model_id).inc(tokens)
    ENCODER_DURATION.labels(model_id).observe(seconds)
    drain_encoder(model_id, engine)


def drain_encoder(model_id: str, engine) -> None:
    sizes = engine.batch_sizes
    seen, end = getattr(engine, "metrics_seen", 0), len(sizes)
    for size in sizes[seen:end]:
        ENCODER_BATCH_SIZE.labels(model_id).observe(size)
    engine.metrics_seen = end
    ENCODER_QUEUE.labels(model_id).set(engine.queued)


PROMPT_CACHE = Counter("llm_prompt_cache_total", "Prompt cache decisions: hit (a held prefix used), miss (a prefix "
                       "computed and stored)", ["result"])
PROMPT_CACHE_TOKENS = Counter("llm_prompt_cache_tokens_total", "Prompt tokens read from the prompt cache (read) or "
                              "stored in it (written)", ["direction"])
PROMPT_CACHE_BYTES = Gauge("llm_prompt_cache_bytes", "Memory held by the prompt cache's states", multiprocess_mode="livesum")
PROMPT_CACHE_SWAPS = Counter("llm_prompt_cache_swaps_total", "Fresh generators swapped in because the prompt cache was full")
RESTARTS = Counter("llm_batch_restarts_total", "Entries whose batch stopped and started again with waiting requests "
                   "(young: a young batch taking in arrivals; merged: an older one merged with them), and "
                   "constrained entries resumed after a refused token (resume)", ["kind"])
INVARIANT_VIOLATIONS = Counter("llm_generation_invariant_violations_total", "Completions ended with an error because "
                               "the engine's tokens did not continue exactly what it had fed (should stay 0)")
SHARED_HEAD_TOKENS = Counter("llm_prompt_shared_head_tokens_total", "Prompt tokens not prefilled because the prompts of "
                             "their batch share them (prefilled once for the batch)")


class _CacheReader:
    """Moves the prompt cache's counters (kept by native threads) into the metrics."""

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}

    def drain(self, engine: Engine) -> None:
        cache = engine.prompt_cache
        if cache is None:
            return
        for name, metric in (("hits", PROMPT_CACHE.labels("hit")), ("misses", PROMPT_CACHE.labels("miss")),
                             ("read_tokens", PROMPT_CACHE_TOKENS.labels("read")),
                             ("written_tokens", PROMPT_CACHE_TOKENS.labels("written")), ("swaps", PROMPT_CACHE_SWAPS)):
            value = getattr(cache, name)
            if value > self._seen.get(name, 0):
                metric.inc(value - self._seen.get(name, 0))
            self._seen[name] = value
        PROMPT_CACHE_BYTES.set(cache.held_bytes)


cache_reader = _CacheReader()


class _BatchSizeReader:
    """Moves new entries of ``engine.batch_sizes`` (appended by native threads) into the histogram, and the growth of
    the engine's counters (shared heads, restarts, invariant violations) into theirs."""

    def __init__(self) -> None:
        self._seen = 0
        self._counted: dict[str, int] = {}

    def _count(self, name: str, value: int, metric) -> None:
        if value > self._counted.get(name, 0):
            metric.inc(value - self._counted.get(name, 0))
        self._counted[name] = value

    def drain(self, engine: Engine) -> None:
        sizes = engine.batch_sizes
        end = len(sizes)
        for size in sizes[self._seen:end]:
            BATCH_SIZE.observe(size)
        self._seen = end
        self._count("head", engine.shared_head_tokens_saved, SHARED_HEAD_TOKENS)
        for kind, value in engine.restarts.items():
            self._count(kind, value, RESTARTS.labels(kind))
        self._count("resume", engine.resumes, RESTARTS.labels("resume"))
        self._count("violations", engine.invariant_violations, INVARIANT_VIOLATIONS)


batch_sizes = _BatchSizeReader()


def observe(engine: Engine, stream: EventStream[Event]) -> EventStream[Event]:
    """Counts a generation in flight until its stream ends (closed before its first event included);
    time to first token, token counters, queue depth and batch sizes as its events pass."""
    started = time.monotonic()
    waiting_for_text = True
    IN_FLIGHT.inc()
    QUEUE_DEPTH.set(engine.queued)

    def on_event(event: Event) -> None:
        nonlocal waiting_for_text
        if waiting_for_text and isinstance(event, TextDelta):
            waiting_for_text = False
            TIME_TO_FIRST_TOKEN.observe(time.monotonic() - started)
            QUEUE_DEPTH.set(engine.queued)
        elif isinstance(event, Done):
            TOKENS.labels("prompt").inc(event.prompt_tokens)
            TOKENS.labels("completion").inc(event.completion_tokens)

    def on_close() -> None:
        IN_FLIGHT.dec()
        QUEUE_DEPTH.set(engine.queued)
        batch_sizes.drain(engine)
        cache_reader.drain(engine)

    return stream.watch(on_event, on_close)


def render(engine: Engine | None) -> tuple[bytes, str]:
    """The exposition text of every worker's metrics."""
    if engine is not None:
        QUEUE_DEPTH.set(engine.queued)
        batch_sizes.drain(engine)
        cache_reader.drain(engine)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
