"""Prometheus metrics (``prometheus_client``), multiprocess-safe under several gunicorn workers.

With ``PROMETHEUS_MULTIPROC_DIR`` set (``gunicorn.conf.py`` does it), every
worker writes its values to files there and ``/metrics`` aggregates them.
Metrics are only ever touched from request greenlets/threads, never from the
engine's native threads.
"""

from __future__ import annotations

import os
import time
import weakref

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as _multiprocess

from .engine.generation import Engine
from .engine.memory import MB, MemoryBudget, peak_resident_bytes, resident_bytes
from .events import Done, Event, EventStream, TextDelta

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter("llm_requests_total", "API requests by route and status", ["route", "status"])
# Chat models: a series per served model id (label ``model``).
TOKENS = Counter("llm_tokens_total", "Tokens processed, by direction (prompt, completion) and model", ["direction", "model"])
TIME_TO_FIRST_TOKEN = Histogram("llm_time_to_first_token_seconds", "From request to first generated text", ["model"],
                                buckets=LATENCY_BUCKETS)
DURATION = Histogram("llm_request_duration_seconds", "From request to the end of its response", ["route"], buckets=LATENCY_BUCKETS)
QUEUE_DEPTH = Gauge("llm_queue_depth", "Completions waiting for an engine batch", ["model"], multiprocess_mode="livesum")
IN_FLIGHT = Gauge("llm_in_flight_requests", "Generations queued or running", ["model"], multiprocess_mode="livesum")
BATCH_SIZE = Histogram("llm_batch_size", "Completions per engine batch", ["model"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
MODEL_LOADED = Gauge("llm_model_loaded", "Whether a chat model is resident (1) or not (0), per worker", ["model"],
                     multiprocess_mode="livesum")
MODEL_LOADS = Counter("llm_model_loads_total", "Chat model loads", ["model"])
MODEL_LOAD_SECONDS = Histogram("llm_model_load_seconds", "Time to load a chat model (conversion included)", ["model"],
                               buckets=LATENCY_BUCKETS)
MODEL_UNLOADS = Counter("llm_model_unloads_total", "Chat model unloads, by reason (lru: room for another under "
                        "LLM_MAX_LOADED_MODELS, memory: room for another in memory, idle, admin)", ["model", "reason"])
CORE_WAITS = Gauge("llm_core_budget_waits", "Engine batches that waited for cores another chat model's batch held "
                   "(since the worker started; several chat models only)", multiprocess_mode="livesum")
RESIDENT_MEMORY = Gauge("llm_resident_memory_bytes", "Resident memory of the worker process", multiprocess_mode="livesum")
PEAK_MEMORY = Gauge("llm_peak_resident_memory_bytes", "Peak resident memory of the worker process (VmHWM)",
                    multiprocess_mode="livemax")
MEMORY_LIMIT = Gauge("llm_memory_limit_bytes", "LLM_MEMORY_LIMIT_MB of a worker (0: no limit)",
                     multiprocess_mode="livemax")
BATCH_MEMORY = Gauge("llm_batch_memory_bytes", "A worker's memory for engine batches, by state: room (what the limit "
                     "leaves after the process, the weights and the prompt caches), held (estimated for the batches "
                     "running now)", ["state"], multiprocess_mode="livesum")
MEMORY_WAITS = Gauge("llm_batch_memory_waits", "Engine batches that waited for memory other batches held (since the "
                     "worker started)", multiprocess_mode="livesum")
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
                       "computed and stored)", ["result", "model"])
PROMPT_CACHE_TOKENS = Counter("llm_prompt_cache_tokens_total", "Prompt tokens read from the prompt cache (read) or "
                              "stored in it (written)", ["direction", "model"])
PROMPT_CACHE_BYTES = Gauge("llm_prompt_cache_bytes", "Memory held by the prompt cache's states", ["model"],
                           multiprocess_mode="livesum")
PROMPT_CACHE_SWAPS = Counter("llm_prompt_cache_swaps_total", "Fresh generators swapped in because the prompt cache was "
                             "full", ["model"])
RESTARTS = Counter("llm_batch_restarts_total", "Entries whose batch stopped and started again with waiting requests "
                   "(young: a young batch taking in arrivals; merged: an older one merged with them), and "
                   "constrained entries resumed after a refused token (resume)", ["kind", "model"])
INVARIANT_VIOLATIONS = Counter("llm_generation_invariant_violations_total", "Completions ended with an error because "
                               "the engine's tokens did not continue exactly what it had fed (should stay 0)", ["model"])
SHARED_HEAD_TOKENS = Counter("llm_prompt_shared_head_tokens_total", "Prompt tokens not prefilled because the prompts of "
                             "their batch share them (prefilled once for the batch)", ["model"])


def model_loaded(model_id: str, seconds: float) -> None:
    MODEL_LOADS.labels(model_id).inc()
    MODEL_LOAD_SECONDS.labels(model_id).observe(seconds)
    MODEL_LOADED.labels(model_id).set(1)


def model_unloaded(model_id: str, reason: str) -> None:
    MODEL_UNLOADS.labels(model_id, reason).inc()
    MODEL_LOADED.labels(model_id).set(0)


class _EngineReader:
    """Moves an engine's counters (kept by its native threads: batch sizes, shared heads, restarts, invariant
    violations, the prompt cache's decisions) into the metrics, counting each engine from where it was last read (a
    reloaded model's new engine starts from zero)."""

    def __init__(self) -> None:
        self._seen: weakref.WeakKeyDictionary[Engine, dict[str, int]] = weakref.WeakKeyDictionary()

    def _count(self, seen: dict[str, int], name: str, value: int, metric) -> None:
        if value > seen.get(name, 0):
            metric.inc(value - seen.get(name, 0))
        seen[name] = value

    def drain(self, model_id: str, engine: Engine) -> None:
        seen = self._seen.setdefault(engine, {})
        sizes = engine.batch_sizes
        end = len(sizes)
        for size in sizes[seen.get("batches", 0):end]:
            BATCH_SIZE.labels(model_id).observe(size)
        seen["batches"] = end
        self._count(seen, "head", engine.shared_head_tokens_saved, SHARED_HEAD_TOKENS.labels(model_id))
        for kind, value in engine.restarts.items():
            self._count(seen, kind, value, RESTARTS.labels(kind, model_id))
        self._count(seen, "resume", engine.resumes, RESTARTS.labels("resume", model_id))
        self._count(seen, "violations", engine.invariant_violations, INVARIANT_VIOLATIONS.labels(model_id))
        QUEUE_DEPTH.labels(model_id).set(engine.queued)
        cache = engine.prompt_cache
        if cache is None:
            return
        for name, metric in (("hits", PROMPT_CACHE.labels("hit", model_id)), ("misses", PROMPT_CACHE.labels("miss", model_id)),
                             ("read_tokens", PROMPT_CACHE_TOKENS.labels("read", model_id)),
                             ("written_tokens", PROMPT_CACHE_TOKENS.labels("written", model_id)),
                             ("swaps", PROMPT_CACHE_SWAPS.labels(model_id))):
            self._count(seen, "cache_" + name, getattr(cache, name), metric)
        PROMPT_CACHE_BYTES.labels(model_id).set(cache.held_bytes)


engine_reader = _EngineReader()


def observe(model_id: str, engine: Engine, stream: EventStream[Event]) -> EventStream[Event]:
    """Counts a generation in flight until its stream ends (closed before its first event included);
    time to first token, token counters, queue depth and batch sizes as its events pass."""
    started = time.monotonic()
    waiting_for_text = True
    in_flight = IN_FLIGHT.labels(model_id)
    in_flight.inc()
    QUEUE_DEPTH.labels(model_id).set(engine.queued)

    def on_event(event: Event) -> None:
        nonlocal waiting_for_text
        if waiting_for_text and isinstance(event, TextDelta):
            waiting_for_text = False
            TIME_TO_FIRST_TOKEN.labels(model_id).observe(time.monotonic() - started)
            QUEUE_DEPTH.labels(model_id).set(engine.queued)
        elif isinstance(event, Done):
            TOKENS.labels("prompt", model_id).inc(event.prompt_tokens)
            TOKENS.labels("completion", model_id).inc(event.completion_tokens)

    def on_close() -> None:
        in_flight.dec()
        engine_reader.drain(model_id, engine)

    return stream.watch(on_event, on_close)


def render(engines: list[tuple[str, Engine]], core_waits: int = 0, memory: MemoryBudget | None = None
           ) -> tuple[bytes, str]:
    """The exposition text of every worker's metrics; ``engines``: the loaded chat models' (id, engine); ``memory``:
    the worker's memory budget (None: no limit)."""
    for model_id, engine in engines:
        engine_reader.drain(model_id, engine)
    CORE_WAITS.set(core_waits)
    RESIDENT_MEMORY.set(resident_bytes())
    PEAK_MEMORY.set(peak_resident_bytes())
    MEMORY_LIMIT.set(memory.limit_bytes if memory is not None else 0)
    if memory is not None:
        BATCH_MEMORY.labels("room").set(memory.room_bytes)
        BATCH_MEMORY.labels("held").set(memory.held * MB)
        MEMORY_WAITS.set(memory.waits)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
