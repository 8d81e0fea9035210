"""The model and engine of one app (one Runtime per mounted LLM), loaded once and shared by its requests.

Loading (and, for the default model, the one-time conversion) runs on a
native thread so that a gevent worker's hub keeps serving the host app's
other requests meanwhile.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import threading
import time
from typing import Any

from . import metrics
from .engine import Model, ModelOptions
from .engine.generation import BatchingOptions, Engine
from .engine.handoff import NativeThread, gevent_patched, native_sleep, run_on_native_thread
from .engine.layout import choose as choose_layout
from .engine.model import DEFAULT_COMPUTE_TYPES, SAMPLING_KEYS, keep_buffers_in_heap, resolve_device
from .engine.prompt_cache import PromptCache, state_bytes_per_token
from .errors import LLMBlueprintError, ModelLoadError
from .events import Event, EventStream, GenerationRequest, TokenLogprob
from .rate_limit import RateLimit
from .registry import Registry

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


class Runtime:
    """Holds the settings, and lazily the :class:`Model` and :class:`Engine`."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings
        self.started = int(time.time())
        self._lock = threading.Lock()  # a greenlet lock under gevent, a thread lock otherwise
        self._engine: Engine | None = None
        self._loading = False  # a background load is under way
        self.load_error: str | None = None  # why the last load failed, for /readyz
        self.sampling_defaults: dict[str, float] = dict(API_SAMPLING_DEFAULTS)  # set at load (model, settings)
        self.system_fingerprint = ""  # set at load: OpenAI's ``system_fingerprint``
        self.draining = False
        self.openapi: dict[str, Any] | None = None
        self.rate_limit: RateLimit | None = None
        self.registry = Registry(settings, lambda: self.model_id)  # the models beside the chat model (LLM_MODELS)
        if settings["LLM_RATE_LIMIT"]:
            self.rate_limit = RateLimit(settings["LLM_RATE_LIMIT"], settings["LLM_RATE_LIMIT_STORAGE"],
                                        settings["LLM_RATE_LIMIT_FAIL_OPEN"])
        atexit.register(self.shutdown)

    @property
    def engine(self) -> Engine:
        """The engine, loading the model on first use. A load that failed is final until the process restarts:
        every request then gets the same 503 at once (the model is broken, not busy; converting it again on every
        request would only repeat the failure)."""
        if self._engine is None:
            with self._lock:
                if self._engine is None and self.load_error is not None:
                    raise ModelLoadError(f"the model could not be loaded: {self.load_error}")
                if self._engine is None:
                    self._engine = self._load_off_the_hub()
        return self._engine

    def start_loading(self) -> None:
        """Load the model in the background (eager start, or a readiness probe in lazy mode): returns at once.
        A request arriving meanwhile waits for this load rather than starting another."""
        self.registry.start_loading()
        if self._engine is not None or self._loading:
            return
        self._loading = True

        def load() -> None:
            try:
                self.engine  # noqa: B018 - loads under the runtime's lock
            except Exception:  # logged once by _load_off_the_hub, shown by /readyz, every request gets 503
                pass
            finally:
                self._loading = False

        if gevent_patched():
            import gevent

            gevent.spawn(load)  # a greenlet: the load itself runs on a native thread (_load_off_the_hub)
        else:
            NativeThread(load, "llm-model-preloader").start()

    @property
    def loading(self) -> bool:
        return self._loading

    @property
    def engine_if_loaded(self) -> Engine | None:
        """The engine when loaded, without triggering a load (health checks)."""
        return self._engine

    def generate(self, request: GenerationRequest) -> EventStream[Event]:
        """Start a generation (typed errors raise here, before any work) with its metrics."""
        engine = self.engine
        return metrics.observe(engine, engine.generate(request))

    # The door from chat/ and api/ to the engine: nothing else of the package holds an Engine.
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
    def model_id(self) -> str:
        configured = self.settings["LLM_MODEL_ID"]
        if configured:
            return configured
        path = self.settings["LLM_MODEL_PATH"]
        if path:
            name = os.path.basename(os.path.normpath(path))
            return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name
        from .engine.default_model import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME

    def _load_off_the_hub(self) -> Engine:
        try:
            engine = run_on_native_thread(self._load, "llm-model-loader")
        except Exception as exc:
            self.load_error = str(exc)
            log.error("loading the model failed (requests get 503 until a restart): %s", exc)
            if isinstance(exc, LLMBlueprintError):
                raise
            raise ModelLoadError(str(exc)) from exc
        self.load_error = None
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
        log.info("engine layout: %d replica(s) x %d thread(s), batches of up to %d (%s)", layout.inter_threads,
                 layout.intra_threads, layout.max_batch_size, layout.how)
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
        log.info("model %s ready as %r (pid %d)", model.path, self.model_id, os.getpid())
        batching = BatchingOptions(
            max_batch_size=layout.max_batch_size,
            gather_seconds=settings["LLM_BATCH_GATHER_MS"] / 1000,
            length_tolerance=settings["LLM_BATCH_LENGTH_TOLERANCE"],
            max_queue=settings["LLM_MAX_QUEUE"],
            deterministic=settings["LLM_DETERMINISTIC"],
        )
        cache = None
        if settings["LLM_PROMPT_CACHE_MB"] > 0:
            cache = PromptCache(state_bytes_per_token(model.path, model.device, model.compute_type), settings["LLM_PROMPT_CACHE_MB"] * 2**20,
                                weights_bytes=model.weights_bytes)
            log.info("prompt cache: up to %d MB (%.0f KB a token held; a fresh generator is swapped in when full)",
                     settings["LLM_PROMPT_CACHE_MB"], cache.bytes_per_token / 1024)
        return Engine(model, heartbeat_interval=settings["LLM_KEEPALIVE_SECONDS"], batching=batching, prompt_cache=cache)

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
        log.info("sampling when a request gives none: %s", ", ".join(origins))
        return chosen

    def start_draining(self, deadline: float) -> None:
        """Graceful stop: refuse new API requests (503/529); generations still running at
        ``deadline`` seconds are ended with their protocol's final events."""
        if self.draining:
            return
        self.draining = True
        log.info("draining: new requests refused, running generations get %.0fs to finish", deadline)
        # Called from a signal handler (under gevent: inside the event loop), so
        # nothing here may block or switch greenlets: a native thread keeps time.
        NativeThread(lambda: self._end_generations(deadline), "llm-drain-timer").start()

    def _end_generations(self, deadline: float) -> None:
        native_sleep(deadline)
        if self._engine is not None:
            self._engine.cancel_all()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine threads and release the model (safe to call twice)."""
        self.registry.shutdown(timeout)
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown(timeout)
            engine.model.close()
