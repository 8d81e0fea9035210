"""One app's LLM state (one Runtime per mounted LLM): settings, chat models, the other models, draining.

The chat models live in chat_models.py (each one's loading and engine in chat_model.py); embedding and rerank
models in registry.py. The default chat model is also reachable here directly (``engine``, ``model``,
``generate``...), as it was when a blueprint served one chat model.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import time
from typing import Any

from .chat_model import API_SAMPLING_DEFAULTS, ChatModel, layout_for, served_id, system_fingerprint
from .chat_models import ChatModels
from .engine import Model
from .engine.generation import Engine
from .engine.handoff import NativeThread, gevent_patched, native_sleep, native_threads_running
from .events import Event, EventStream, GenerationRequest
from .rate_limit import RateLimit
from .registry import Registry

log = logging.getLogger("llm_blueprint")

__all__ = ["API_SAMPLING_DEFAULTS", "Runtime", "layout_for", "system_fingerprint"]


class Runtime:
    """Holds the settings, the chat models (chat_models.py) and the other models (registry.py) of one app."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings
        self.started = int(time.time())
        self.draining = False
        self.openapi: dict[str, Any] | None = None
        self.rate_limit: RateLimit | None = None
        self.registry = Registry(settings, lambda: served_id(settings))  # every served id and kind (LLM_MODELS)
        self.chat = ChatModels(settings, self.registry.chat_specs)
        if settings["LLM_RATE_LIMIT"]:
            self.rate_limit = RateLimit(settings["LLM_RATE_LIMIT"], settings["LLM_RATE_LIMIT_STORAGE"],
                                        settings["LLM_RATE_LIMIT_FAIL_OPEN"])
        self._preloading = False
        self._stopped: bool | None = None  # shutdown's outcome (None: not shut down yet)
        atexit.register(self.shutdown)

    def chat_model(self, model_id: str | None = None) -> ChatModel:
        """A chat model by its served id (None: the default one)."""
        return self.chat.get(model_id)

    # The default chat model (LLM_MODEL_PATH, or the embedded one): what readiness and the single-model API are about.
    @property
    def default(self) -> ChatModel:
        return self.chat.default

    @property
    def engine(self) -> Engine:
        return self.default.engine

    @property
    def engine_if_loaded(self) -> Engine | None:
        return self.default.engine_if_loaded

    @property
    def load_error(self) -> str | None:
        return self.default.load_error

    @property
    def loading(self) -> bool:
        return self._preloading or self.default.loading

    @property
    def model(self) -> Model:
        return self.default.model

    @property
    def model_id(self) -> str:
        return self.default.id

    def generate(self, request: GenerationRequest) -> EventStream[Event]:
        return self.default.generate(request)

    def start_loading(self) -> None:
        """Load the default model in the background (eager start, or a readiness probe in lazy mode): returns at once.
        A request arriving meanwhile waits for this load rather than starting another."""
        self.registry.start_loading()
        if self.default.engine_if_loaded is not None or self._preloading:
            return
        self._preloading = True

        def load() -> None:
            try:
                self.default.engine  # noqa: B018 - loads under the model's lock
            except Exception:  # logged once by the load, shown by /readyz, every request gets 503
                pass
            finally:
                self._preloading = False

        if gevent_patched():
            import gevent

            gevent.spawn(load)  # a greenlet: the load itself runs on a native thread
        else:
            NativeThread(load, "llm-model-preloader").start()

    def start_draining(self, deadline: float) -> None:
        """Graceful stop: refuse new API requests (503/529); generations still running at
        ``deadline`` seconds are ended with their protocol's final events."""
        if self.draining:
            return
        self.draining = True
        log.info("draining: new requests refused, running generations get %.0fs to finish", deadline)
        # Called from a signal handler (under gevent: inside the event loop), so
        # nothing here may block or switch greenlets: a native thread keeps time.
        NativeThread(lambda: self._end_generations(deadline), "llm-drain-timer", native=False).start()

    def _end_generations(self, deadline: float) -> None:
        native_sleep(deadline)
        for model in self.chat.loaded():
            engine = model.engine_if_loaded
            if engine is not None:
                engine.cancel_all()

    def shutdown(self, timeout: float = 10.0) -> bool:
        """Stop the engine threads and release the models (safe to call twice). False when an engine call (a
        warm-up, a prefill: neither can be interrupted) was still running on a native thread after ``timeout``."""
        if self._stopped is None:
            stopped = self.registry.shutdown(timeout)
            self._stopped = self.chat.shutdown(timeout) and stopped
        return self._stopped

    def end_process_if_busy(self) -> None:
        """A gunicorn worker is exiting (``worker_exit``): when a native call still runs after :meth:`shutdown` (an
        engine's warm-up or prefill, a model's load or conversion in the background), end the process now, without
        the interpreter's finalization and the native libraries' exit handlers, which would run under that call and
        crash the process (SIGSEGV one exit in two with a 9,000-token warm-up of Gemma 3 running, issue #35;
        "terminate called without an active exception" with the embedding model still loading). Nothing is lost: the
        requests were drained, and what the call computes is not wanted any more."""
        stopped = self.shutdown()
        running = native_threads_running(timeout=5.0 if stopped else 0.0)
        if stopped and not running:
            return
        log.warning("native work was still running at exit (%s): a CTranslate2 call cannot be interrupted, so the "
                    "process ends now, without the native libraries' exit handlers", ", ".join(running) or "an engine")
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        os._exit(0)
