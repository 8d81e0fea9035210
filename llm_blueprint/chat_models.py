"""The chat models of one blueprint: which are loaded, loading one on demand, unloading to make room or when idle.

- ``LLM_MODEL_PATH`` (or the embedded default, or the first chat entry of ``LLM_MODELS``) is the *default* chat
  model: requests that name none get it, ``/readyz`` is about it, and the idle timeout never unloads it.
- Every other chat entry of ``LLM_MODELS`` is a chat model of its own: its own engine (scheduler, measured layout,
  prompt cache, sampling defaults, chat template and parsing), loaded on its first request.
- Room: at most ``LLM_MAX_LOADED_MODELS`` chat models are resident; unset, as many as the memory holds (a model
  about to load needs about twice its file's size; the least recently used idle models are unloaded until the
  machine's available memory covers that, keeping a tenth of it free). A model that is generating, or whose
  request is on its way to the engine, is never unloaded: a load that needs its place waits for it (at most
  ``LLM_MODEL_LOAD_WAIT_SECONDS``, then a 503 to retry).
- ``LLM_MODEL_IDLE_SECONDS`` unloads a model (not the default) nobody used for that long.
- Cores: the engines of a worker share its cores through one :class:`~llm_blueprint.engine.cores.CoreBudget`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from .chat_model import ChatModel, served_id
from .engine.cores import CoreBudget
from .engine.handoff import gevent_patched
from .engine.memory import MemoryBudget, meminfo, memory_limit_default, prompt_cache_default_mb, resident_bytes
from .errors import ModelBusy
from .registry import entry_settings

log = logging.getLogger("llm_blueprint")

def _source_bytes(path: str | None) -> int:
    """Bytes of a model's files on disk (a .gguf, or a folder's weights); 300 MB for the embedded default."""
    if not path:
        return 300 * 2**20
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files
                     if f.endswith((".bin", ".safetensors", ".gguf", ".pt")))
    return total


class ChatModels:
    """Every chat model of a blueprint by id, the default first."""

    def __init__(self, settings: dict[str, Any], extra: dict[str, dict[str, Any]]):
        self.settings = settings
        cores = None
        if extra and settings["LLM_DEVICE"] != "cuda" and settings["LLM_SHARE_CORES"]:
            from .engine.layout import usable_cores

            cores = CoreBudget(settings["LLM_CORES"] or usable_cores())
        self.cores = cores
        if settings["LLM_MEMORY_LIMIT_MB"] is None:  # sized from the machine (memory.py)
            settings["LLM_MEMORY_LIMIT_MB"] = memory_limit_default() // 2**20
        limit = settings["LLM_MEMORY_LIMIT_MB"]
        # the worker's memory for batches, shared by its chat models' engines (what the process holds now is the base)
        self.memory = MemoryBudget(limit * 2**20, resident_bytes()) if limit else None
        if settings["LLM_PROMPT_CACHE_MB"] is None:  # sized from the worker's memory (memory.py), once for every model
            cap = settings["LLM_MAX_LOADED_MODELS"] or (1 + len(extra))
            settings["LLM_PROMPT_CACHE_MB"] = prompt_cache_default_mb(min(cap, 1 + len(extra)), limit)
        self.default = ChatModel(settings, cores, self.make_room, self.memory)
        self.models: dict[str, ChatModel] = {self.default.id: self.default}
        for model_id, spec in extra.items():
            self.models[model_id] = ChatModel(entry_settings(settings, model_id, spec), cores, self.make_room,
                                              self.memory)
        self.room = threading.Lock()  # one decision about room at a time (a greenlet lock under gevent)
        self._sweeping = False
        self.closed = False

    def get(self, model_id: str | None) -> ChatModel:
        """The chat model of that id (the default for None)."""
        if not self._sweeping and self.settings["LLM_MODEL_IDLE_SECONDS"]:
            self._start_idle_sweeper()
        return self.default if model_id is None else self.models[model_id]

    def ids(self) -> list[str]:
        return list(self.models)

    def loaded(self) -> list[ChatModel]:
        return [m for m in self.models.values() if m.engine_if_loaded is not None]

    # Room ---------------------------------------------------------------------------
    def make_room(self, model: ChatModel) -> None:
        """Before ``model`` loads: unload the least recently used idle models while the count or the memory says
        there is no room; wait for a busy one to finish when nothing idle can go (ModelBusy past the wait)."""
        if len(self.models) == 1:
            return
        cap = self.settings["LLM_MAX_LOADED_MODELS"]
        deadline = time.monotonic() + self.settings["LLM_MODEL_LOAD_WAIT_SECONDS"]
        while True:
            with self.room:
                others = [m for m in self.models.values()
                          if m is not model and (m.engine_if_loaded is not None or m.loading)]
                if cap:
                    reason = "lru" if len(others) >= cap else None
                else:
                    reason = "memory" if others and not self._fits(model) else None
                if reason is None:
                    return
                idle = sorted((m for m in others if m.engine_if_loaded is not None and not m.busy),
                              key=lambda m: m.last_used)
                if idle:
                    idle[0].unload(reason)
                    continue
            if reason == "memory":  # a soft rule: with nothing idle to unload, the load goes ahead
                log.warning("loading %r with less free memory than it needs (every other loaded model is busy)",
                            model.id)
                return
            if time.monotonic() >= deadline:
                raise ModelBusy(model.id, cap)
            time.sleep(0.1)  # a greenlet's sleep under gevent

    def _fits(self, model: ChatModel) -> bool:
        info = meminfo()
        if "MemAvailable" not in info:
            return True
        need = 2 * _source_bytes(model.settings["LLM_MODEL_PATH"])
        return need <= info["MemAvailable"] - info.get("MemTotal", 0) // 10

    # Idle models -----------------------------------------------------------------------
    def _start_idle_sweeper(self) -> None:
        self._sweeping = True
        idle = float(self.settings["LLM_MODEL_IDLE_SECONDS"])

        def sweep() -> None:
            while not self.closed:
                time.sleep(min(idle / 2, 5.0))
                now = time.monotonic()
                for model in list(self.models.values()):
                    if (model is not self.default and model.engine_if_loaded is not None and not model.busy
                            and now - model.last_used >= idle):
                        with self.room:
                            model.unload("idle")

        if gevent_patched():
            import gevent

            gevent.spawn(sweep)
        else:
            threading.Thread(target=sweep, name="llm-idle-models", daemon=True).start()

    def shutdown(self, timeout: float = 10.0) -> bool:
        """Stop every engine; False when a native call was still running after ``timeout``."""
        self.closed = True
        deadline = time.monotonic() + timeout
        stopped = True
        for model in self.models.values():
            stopped = model.shutdown(max(0.0, deadline - time.monotonic())) and stopped
        return stopped


__all__ = ["ChatModels", "entry_settings", "served_id"]
