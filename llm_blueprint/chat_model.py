"""One chat model of a blueprint: its settings, and once loaded its Model and Engine.

Loading (and, for a .gguf file or a Hugging Face folder, the one-time
conversion) runs on a native thread so that a gevent worker's hub keeps
serving the host app's other requests meanwhile. A model can be unloaded
(least recently used, idle, or by an operator: chat_models.py) and loads
again on its next request.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from . import metrics
from .engine import Model, ModelOptions
from .engine.cores import CoreBudget
from .engine.generation import BatchingOptions, Engine
from .engine.handoff import run_on_native_thread
from .engine.layout import choose as choose_layout
from .engine.memory import MemoryBudget, prompt_cache_default_mb
from .engine.model import DEFAULT_COMPUTE_TYPES, SAMPLING_KEYS, keep_buffers_in_heap, resolve_device
from .engine.prompt_cache import PromptCache, release_freed_memory, state_bytes_per_token
from .errors import ModelLoadError
from .events import Event, EventStream, GenerationRequest, TokenLogprob

log = logging.getLogger("llm_blueprint")

# What the OpenAI and Anthropic APIs do when a request names no sampling field (top_k 0: off).
API_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}


def system_fingerprint(model: Model, deterministic: bool) -> str:
    """OpenAI's ``system_fingerprint``: what, besides the request and its seed, decides the output. The model's files
    (config.json's bytes and model.bin's size: no read of the weights), the device, compute type, deterministic
    batching and the CTranslate2 version; stable across restarts, new when any of them changes."""
    import ctranslate2

    digest = hashlib.sha256()
    with open(os.path.join(model.path, "config.json"), "rb") as f:
        digest.update(f.read())
    weights = os.path.getsize(os.path.join(model.path, "model.bin"))
    digest.update(f"|{weights}|{model.device}|{model.compute_type}|{int(deterministic)}|{ctranslate2.__version__}".encode())
    return "fp_" + digest.hexdigest()[:10]


def layout_for(path: str, settings: dict[str, Any], measure: bool = False):
    """The thread layout the engine loads the model directory ``path`` with under ``settings`` (cached, or measured;
    ``measure``: measured again, replacing the cached one)."""
    from .convert.model_cache import default_cache_dir

    device = resolve_device(settings["LLM_DEVICE"])
    compute_type = settings["LLM_COMPUTE_TYPE"] or DEFAULT_COMPUTE_TYPES[device]
    return choose_layout(path, device, compute_type, settings["LLM_CACHE_DIR"] or default_cache_dir(),
                         cores=settings["LLM_CORES"], inter_threads=settings["LLM_INTER_THREADS"],
                         intra_threads=settings["LLM_INTRA_THREADS"], max_batch_size=settings["LLM_MAX_BATCH_SIZE"],
                         measure=measure)


def served_id(settings: dict[str, Any]) -> str:
    """The id a chat model is served as: LLM_MODEL_ID, else the name of its path, else the embedded default's."""
    if settings["LLM_MODEL_ID"]:
        return settings["LLM_MODEL_ID"]
    path = settings["LLM_MODEL_PATH"]
    if path:
        name = os.path.basename(os.path.normpath(path))
        return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name
    from .engine.default_model import DEFAULT_MODEL_NAME

    return DEFAULT_MODEL_NAME


class ChatModel:
    """A chat model: loads on first use (``engine``), serves generations, unloads when told (never while busy).

    ``settings`` are the blueprint's with the model's own entry applied (path, id, chat template, context length,
    compute type, threads). ``make_room`` is called before a load (the pool unloads others to make room for it)."""

    def __init__(self, settings: dict[str, Any], cores: CoreBudget | None = None,
                 make_room: Callable[[ChatModel], None] | None = None, memory: MemoryBudget | None = None):
        self.settings = settings
        self.cores = cores
        self.memory = memory  # the worker's memory for batches (memory.py), shared with the other chat models
        self.make_room = make_room
        self._lock = threading.Lock()  # a greenlet lock under gevent, a thread lock otherwise
        self._engine: Engine | None = None
        self.loading = False  # a load is under way
        self.load_error: str | None = None  # why the last load failed (final until a restart or an operator's load)
        self.sampling_defaults: dict[str, float] = dict(API_SAMPLING_DEFAULTS)  # set at load (model, settings)
        self.system_fingerprint = ""  # set at load: OpenAI's ``system_fingerprint``
        self.last_used = time.monotonic()
        self.pins = 0  # requests between choosing this model and starting their generation
        self.in_flight = 0  # generations whose streams are open
        self.loaded_once = False
        self.load_seconds: float | None = None

    @property
    def id(self) -> str:
        return served_id(self.settings)

    # Loading and unloading -------------------------------------------------------
    @property
    def engine(self) -> Engine:
        """The engine, loading the model on first use. A load that failed is final until the process restarts (or
        an operator loads it again): every request then gets the same 503 at once (the model is broken, not busy;
        converting it again on every request would only repeat the failure)."""
        self.last_used = time.monotonic()
        engine = self._engine
        if engine is None:
            with self._lock:
                if self._engine is None and self.load_error is not None:
                    raise ModelLoadError(f"the model {self.id!r} could not be loaded: {self.load_error}")
                if self._engine is None:
                    self.loading = True
                    try:
                        if self.make_room is not None:
                            self.make_room(self)
                        self._engine = self._load_off_the_hub()
                    finally:
                        self.loading = False
            engine = self._engine
        return engine

    def load(self) -> None:
        """Load now (making room as a request would); a failure raises (ModelLoadError)."""
        self.engine  # noqa: B018

    @property
    def engine_if_loaded(self) -> Engine | None:
        """The engine when loaded, without triggering a load (health checks)."""
        return self._engine

    @property
    def busy(self) -> bool:
        """Whether a request is using this model (chosen, queued, generating, or streaming)."""
        engine = self._engine
        return bool(self.pins or self.in_flight or self.loading or (engine is not None and (engine.queued or engine.running)))

    def retry_after_failure(self) -> None:
        """Forget a failed load so that the next use tries again (an operator's explicit load)."""
        self.load_error = None

    def unload(self, reason: str, timeout: float = 10.0) -> bool:
        """Stop the engine and free the model (its weights, its prompt cache's states, and the heap pages they held);
        False when it is busy or not loaded. Runs the teardown on a native thread."""
        with self._lock:
            engine = self._engine
            if engine is None or self.busy:
                return False
            self._engine = None

        def teardown() -> None:
            engine.shutdown(timeout)
            engine.model.close()
            release_freed_memory()
            if self.memory is not None:
                self.memory.drop(self.id)

        run_on_native_thread(teardown, "llm-model-unloader")
        metrics.model_unloaded(self.id, reason)
        log.info("model %r unloaded (%s)", self.id, reason)
        return True

    def shutdown(self, timeout: float = 10.0) -> bool:
        """Stop for good (the process ends): running generations are cancelled, the model is released. False when
        an engine call (a warm-up, a prefill: neither can be interrupted) was still running after ``timeout``."""
        engine, self._engine = self._engine, None
        if engine is None:
            return True
        stopped = engine.shutdown(timeout)
        engine.model.close()
        return stopped

    def _load_off_the_hub(self) -> Engine:
        started = time.monotonic()
        try:
            engine = run_on_native_thread(self._load, "llm-model-loader")
        except Exception as exc:
            self.load_error = str(exc)
            log.error("loading the model %r failed (requests for it get 503 until a restart): %s", self.id, exc)
            raise ModelLoadError(f"the model {self.id!r} could not be loaded: {exc}") from exc
        self.load_error = None
        self.loaded_once = True
        self.load_seconds = time.monotonic() - started
        metrics.model_loaded(self.id, self.load_seconds)
        return engine

    def _load(self) -> Engine:
        settings = self.settings
        path = settings["LLM_MODEL_PATH"]
        if not path:
            from .engine.default_model import prepare_default_model

            path = prepare_default_model(settings["LLM_CACHE_DIR"])
        else:  # a .gguf file or a Hugging Face folder is converted once into the cache
            from .convert.model_cache import check_model_path, prepare_model_dir

            check_model_path(path)
            path = prepare_model_dir(path, settings["LLM_CACHE_DIR"], settings["LLM_COMPUTE_TYPE"])

        device = resolve_device(settings["LLM_DEVICE"])
        compute_type = settings["LLM_COMPUTE_TYPE"] or DEFAULT_COMPUTE_TYPES[device]
        if device == "cpu" and (threshold := keep_buffers_in_heap()):
            log.info("glibc mmap threshold set to %d MB (the engine's growing buffers are reused from the heap)",
                     threshold // 2**20)
        layout = layout_for(path, settings)
        log.info("engine layout of %r: %d replica(s) x %d thread(s), batches of up to %d (%s)", self.id,
                 layout.inter_threads, layout.intra_threads, layout.max_batch_size, layout.how)
        model = Model(
            path,
            ModelOptions(
                device=device,
                compute_type=compute_type,
                inter_threads=layout.inter_threads,
                intra_threads=layout.intra_threads,
                context_length=settings["LLM_CONTEXT_LENGTH"],
                chat_template=settings["LLM_CHAT_TEMPLATE"],
            ),
        )
        self.sampling_defaults = self._sampling_defaults(model)
        self.system_fingerprint = system_fingerprint(model, settings["LLM_DETERMINISTIC"])
        log.info("model %s ready as %r (pid %d)", model.path, self.id, os.getpid())
        batching = BatchingOptions(
            max_batch_size=layout.max_batch_size,
            gather_seconds=settings["LLM_BATCH_GATHER_MS"] / 1000,
            length_tolerance=settings["LLM_BATCH_LENGTH_TOLERANCE"],
            max_queue=settings["LLM_MAX_QUEUE"],
            deterministic=settings["LLM_DETERMINISTIC"],
        )
        cache = None
        budget = settings["LLM_PROMPT_CACHE_MB"]
        if budget is None:  # a ChatModel outside ChatModels
            budget = prompt_cache_default_mb(1, settings["LLM_MEMORY_LIMIT_MB"])
        if budget > 0:
            cache = PromptCache(state_bytes_per_token(model.path, model.device, model.compute_type), budget * 2**20,
                                weights_bytes=model.weights_bytes)
            log.info("prompt cache of %r: up to %d MB (%.0f KB a token held; a fresh generator is swapped in when full)",
                     self.id, budget, cache.bytes_per_token / 1024)
        memory = self.memory if device == "cpu" else None
        if memory is not None:
            memory.hold(self.id, model.weights_bytes + budget * 2**20)
        engine = Engine(model, heartbeat_interval=settings["LLM_KEEPALIVE_SECONDS"], batching=batching,
                        prompt_cache=cache, cores=self.cores if device == "cpu" else None, memory=memory)
        if memory is not None:
            log.info("memory of %r: %d MB for batches within LLM_MEMORY_LIMIT_MB=%d, so at most %d tokens of context "
                     "(the model's own: %d)", self.id, memory.capacity, settings["LLM_MEMORY_LIMIT_MB"],
                     engine.context_limit, model.context_length)
        return engine

    def _sampling_defaults(self, model: Model) -> dict[str, float]:
        """What a request that gives no sampling field gets: the setting, else the model's recommendation, else the
        APIs' own default; logged once with where each came from."""
        chosen, origins = {}, []
        for key in SAMPLING_KEYS:
            configured = self.settings[f"LLM_DEFAULT_{key.upper()}"]
            if configured is not None:
                chosen[key], origin = configured, "setting"
            elif key in model.sampling:
                chosen[key], origin = model.sampling[key], "model's generation_config.json"
            else:
                chosen[key], origin = API_SAMPLING_DEFAULTS[key], "API default"
            origins.append(f"{key} {chosen[key]:g} ({origin})")
        log.info("sampling of %r when a request gives none: %s", self.id, ", ".join(origins))
        return chosen

    # The GenerationService: the door from chat/ and api/ to an engine ------------------
    def generate(self, request: GenerationRequest) -> EventStream[Event]:
        """Start a generation (typed errors raise here, before any work) with its metrics."""
        engine = self.engine
        stream = metrics.observe(self.id, engine, engine.generate(request))
        self.in_flight += 1

        def closed() -> None:
            self.in_flight -= 1
            self.last_used = time.monotonic()

        return stream.watch(on_close=closed)

    def validate(self, request: GenerationRequest) -> None:
        self.engine.validate(request)

    def warm(self, ids: list[int]) -> None:
        self.engine.warm(ids)

    def score_continuations(self, prompt_ids: list[int], continuations: list[list[int]]) -> list[float]:
        return self.engine.score_continuations(prompt_ids, continuations)

    def prompt_logprobs(self, prompt_ids: list[int], top: int = 0) -> list[TokenLogprob]:
        return self.engine.prompt_logprobs(prompt_ids, top)

    @property
    def prompt_cache_enabled(self) -> bool:
        cache = self.engine.prompt_cache
        return cache is not None and cache.enabled

    @property
    def model(self) -> Model:
        return self.engine.model

    @property
    def context_limit(self) -> int:
        """The context a request may use: the model's, or less where the worker's memory budget holds less."""
        return self.engine.context_limit

    @property
    def model_id(self) -> str:
        return self.id

    def status(self) -> dict[str, Any]:
        """This model's state for /v1/models and /readyz: loaded, loading, unloaded (loads on first use), failed."""
        if self._engine is not None:
            state = "loaded"
        elif self.loading:
            state = "loading"
        elif self.load_error is not None:
            state = "failed"
        else:
            state = "unloaded"
        body: dict[str, Any] = {"kind": "chat", "status": state}
        if self.load_error is not None and state == "failed":
            body["error"] = self.load_error
        return body
