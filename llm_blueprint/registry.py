"""The models one blueprint serves, by id and kind: chat models, and any number of embedding and rerank models.

The default chat model is ``LLM_MODEL_PATH``/``LLM_MODEL_ID`` (or the embedded default: the zero-configuration
case); ``LLM_MODELS`` adds models beside it. Its ``chat`` entries are further chat models (chat_models.py loads
and unloads them); without ``LLM_MODEL_PATH``, the first of them is the default one. Every route asks
:meth:`Registry.resolve` for the id it was given and the kind it serves: an unknown id is a 404, an id of another
kind a 400, each in the route's protocol envelope.

Embedding and rerank models are loaded on first use (or at start with ``LLM_EAGER_LOAD``), each on a native
thread, converted once into ``LLM_CACHE_DIR`` when given as a Hugging Face folder. All models of a worker share its
cores: each encoder runs ``LLM_ENCODER_THREADS`` (default ``LLM_CORES``) OpenMP threads, so an embedding batch and
a chat batch running at the same moment compete for the same cores rather than each getting a reserved share.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import EngineShutDown, ModelLoadError, ModelNotFound, WrongModelKind

log = logging.getLogger("llm_blueprint")

CHAT, EMBEDDING, RERANK = "chat", "embedding", "rerank"
PACKAGED = "<packaged>"  # the path of the embedding model shipped in a package (all-MiniLM-L6-v2), resolved at load
KINDS = (CHAT, EMBEDDING, RERANK)
ENCODER_OPTIONS = {"pooling", "normalize", "dimensions", "compute_type", "threads", "replicas"}
ENTRY_OPTIONS = {"path", "kind", "chat_template", "context_length"} | ENCODER_OPTIONS


# What an LLM_MODELS chat entry may set, and the setting each one overrides for that model.
CHAT_ENTRY_SETTINGS = {
    "path": "LLM_MODEL_PATH", "chat_template": "LLM_CHAT_TEMPLATE", "context_length": "LLM_CONTEXT_LENGTH",
    "compute_type": "LLM_COMPUTE_TYPE", "threads": "LLM_INTRA_THREADS", "replicas": "LLM_INTER_THREADS",
}


def entry_settings(settings: dict[str, Any], model_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The blueprint's settings with a chat entry of LLM_MODELS applied (its id, path and own options)."""
    own = dict(settings)
    own["LLM_MODEL_ID"] = model_id
    for option, key in CHAT_ENTRY_SETTINGS.items():
        if spec.get(option) is not None:
            own[key] = spec[option]
    return own


@dataclass
class ModelEntry:
    """One served model beside the chat model."""

    id: str
    kind: str
    path: str
    options: dict[str, Any] = field(default_factory=dict)
    engine: Any = None  # the EncoderEngine, once loaded
    load_error: str | None = None


def model_kind(path: str) -> str:
    """What a model path serves, read from its files without loading it: a cross-encoder (a sequence
    classification head) reranks, another BERT-family encoder embeds, anything else chats."""
    from .engine.encoder import encoder_kind, is_encoder_dir

    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        if is_encoder_dir(path):
            return encoder_kind(path)
        from .convert.encoder_hf import is_encoder_folder

        if is_encoder_folder(path):
            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                architectures = json.load(f).get("architectures") or []
            return RERANK if any(a.endswith("ForSequenceClassification") for a in architectures) else EMBEDDING
        return CHAT
    if path.lower().endswith(".gguf"):
        from .convert.encoder_gguf import gguf_encoder_kind

        return gguf_encoder_kind(path) or CHAT
    return CHAT


class Registry:
    """Served model ids and kinds; loads and holds the embedding and rerank engines."""

    def __init__(self, settings: dict[str, Any], chat_id: Callable[[], str]):
        self.settings = settings
        self._chat_id = chat_id
        self.entries: dict[str, ModelEntry] = {}
        self._lock = threading.Lock()  # a greenlet lock under gevent, a thread lock otherwise
        self._loading = False
        self.closed = False  # shut down (the process ends): a load that ends after that is not kept
        self._chat_from_models = False
        self.chat_specs: dict[str, dict[str, Any]] = {}  # chat models beside the default one, by id
        from .engine.default_model import DEFAULT_EMBEDDING_NAME

        for model_id, spec in (settings.get("LLM_MODELS") or {}).items():
            unknown = set(spec) - ENTRY_OPTIONS
            if unknown:
                raise ValueError(f"LLM_MODELS[{model_id!r}]: unknown option(s) {sorted(unknown)}; "
                                 f"known: {sorted(ENTRY_OPTIONS)}")
            if not spec.get("path") and model_id == DEFAULT_EMBEDDING_NAME:
                spec = {**spec, "path": PACKAGED, "kind": EMBEDDING}
            if not spec.get("path"):
                raise ValueError(f"LLM_MODELS[{model_id!r}] needs a path (only {DEFAULT_EMBEDDING_NAME!r}, the packaged "
                                 "embedding model, needs none)")
            kind = spec.get("kind") or model_kind(spec["path"])
            if kind not in KINDS:
                raise ValueError(f"LLM_MODELS[{model_id!r}]: kind {kind!r} is not one of {', '.join(KINDS)}")
            own = {"path", "kind"} | (set(CHAT_ENTRY_SETTINGS) if kind == CHAT else ENCODER_OPTIONS)
            if set(spec) - own:
                raise ValueError(f"LLM_MODELS[{model_id!r}]: unknown option(s) {sorted(set(spec) - own)} for a {kind} "
                                 f"model; known: {sorted(own)}")
            if kind == CHAT:
                self._set_chat_model(model_id, spec)
                continue
            self.entries[model_id] = ModelEntry(model_id, kind, spec["path"], {k: v for k, v in spec.items() if k != "path"})
        self._add_packaged_embedding_model()
        if self.chat_id in self.entries or self.chat_id in self.chat_specs:
            raise ValueError(f"LLM_MODELS: {self.chat_id!r} is already the default chat model's id")
        chat_path = settings.get("LLM_MODEL_PATH")
        if chat_path and os.path.exists(chat_path) and model_kind(chat_path) != CHAT:
            raise ValueError(f"LLM_MODEL_PATH {chat_path} is an {model_kind(chat_path)} model, not a chat model: serve it "
                             "through LLM_MODELS")

    def _add_packaged_embedding_model(self) -> None:
        """all-MiniLM-L6-v2, when its package is installed and no embedding model is configured: ``/v1/embeddings``
        then works with no setting at all, as chat does with the embedded SmolLM2 (LLM_DEFAULT_EMBEDDINGS=0: off)."""
        from .engine.default_model import DEFAULT_EMBEDDING_NAME, default_embedding_zip

        if not self.settings.get("LLM_DEFAULT_EMBEDDINGS", True) or any(e.kind == EMBEDDING for e in self.entries.values()):
            return
        if DEFAULT_EMBEDDING_NAME in self.entries or default_embedding_zip() is None:
            return
        self.entries[DEFAULT_EMBEDDING_NAME] = ModelEntry(DEFAULT_EMBEDDING_NAME, EMBEDDING, PACKAGED)

    def _set_chat_model(self, model_id: str, spec: dict[str, Any]) -> None:
        """A chat entry of LLM_MODELS: the default chat model when it names LLM_MODEL_PATH's model, or when
        LLM_MODEL_PATH is unset and it comes first; otherwise a chat model beside it."""
        settings = self.settings
        path = settings.get("LLM_MODEL_PATH")
        names_default = path and os.path.abspath(path) == os.path.abspath(spec["path"]) and not self._chat_from_models
        if names_default or (not path and not self._chat_from_models):
            settings.update(entry_settings(settings, model_id, spec))
            self._chat_from_models = True
            return
        if model_id == self.chat_id:
            raise ValueError(f"LLM_MODELS: {model_id!r} is already the default chat model's id")
        self.chat_specs[model_id] = spec

    # Ids and kinds ---------------------------------------------------------------
    @property
    def chat_id(self) -> str:
        return self._chat_id()

    def models(self) -> list[tuple[str, str]]:
        """(id, kind) of every served model, the chat models first (the default one first of all)."""
        chat = [self.chat_id] + [m for m in self.chat_specs if m != self.chat_id]
        return [(m, CHAT) for m in chat] + [(e.id, e.kind) for e in self.entries.values()]

    def ids_of(self, kind: str) -> list[str]:
        return [model_id for model_id, k in self.models() if k == kind]

    def kind_of(self, model_id: str) -> str | None:
        if model_id == self.chat_id or model_id in self.chat_specs:
            return CHAT
        entry = self.entries.get(model_id)
        return entry.kind if entry else None

    def resolve(self, name: str | None, kind: str | None, accept_any: bool = False) -> str:
        """The served id a request's ``model`` names for a route serving ``kind`` (None: any kind).

        No name: the first model of that kind. An unknown name: 404 (or, with ``LLM_ACCEPT_ANY_MODEL``, the first
        model of that kind); a model of another kind: 400.
        """
        candidates = self.ids_of(kind) if kind else [m for m, _ in self.models()]
        if name is None:
            if candidates:
                return candidates[0]
            raise ModelNotFound("", "", message=f"This server serves no {kind} model (see LLM_MODELS).")
        found = self.kind_of(name)
        if found is not None and (kind is None or found == kind):
            return name
        if found is not None:
            raise WrongModelKind(name, found, kind, candidates)
        if accept_any and candidates:
            return candidates[0]
        raise ModelNotFound(name, "', '".join(candidates) if candidates else "no model of this kind")

    # Encoders ---------------------------------------------------------------------
    def encoder(self, model_id: str):
        """The loaded :class:`~llm_blueprint.engine.encoder.EncoderEngine` of an embedding or rerank model (loading it
        off the event loop on first use)."""
        entry = self.entries[model_id]
        if entry.engine is None and entry.load_error is not None:
            raise ModelLoadError(f"the {entry.kind} model {model_id!r} could not be loaded: {entry.load_error}")
        if entry.engine is None:
            with self._lock:
                if entry.engine is None and entry.load_error is not None:
                    raise ModelLoadError(f"the {entry.kind} model {model_id!r} could not be loaded: {entry.load_error}")
                if entry.engine is None:
                    from .engine.handoff import run_on_native_thread

                    # A failed load is final until the process restarts: logged once, and every request for the
                    # model gets the same 503 at once instead of converting again (the model is broken, not busy).
                    try:
                        engine = run_on_native_thread(lambda: self._load(entry), "llm-encoder-loader")
                    except Exception as exc:
                        entry.load_error = str(exc)
                        log.error("loading the %s model %r failed (requests for it get 503 until a restart): %s",
                                  entry.kind, model_id, exc)
                        raise ModelLoadError(f"the {entry.kind} model {model_id!r} could not be loaded: {exc}") from exc
                    if self.closed:  # the worker shut down while it loaded: its threads must not outlive that
                        engine.shutdown()
                        engine.model.close()
                        raise EngineShutDown("the server is shutting down")
                    entry.engine = engine
        return entry.engine

    def status(self) -> dict[str, dict[str, str]]:
        """Each embedding/rerank model's state: loaded, not loaded (loads on first use), or failed (with why)."""
        out = {}
        for entry in self.entries.values():
            if entry.engine is not None:
                out[entry.id] = {"kind": entry.kind, "status": "loaded"}
            elif entry.load_error is not None:
                out[entry.id] = {"kind": entry.kind, "status": "failed", "error": entry.load_error}
            else:
                out[entry.id] = {"kind": entry.kind, "status": "unloaded"}
        return out

    def loaded(self) -> list[tuple[str, Any]]:
        """(id, engine) of the encoders loaded so far."""
        return [(e.id, e.engine) for e in self.entries.values() if e.engine is not None]

    def _load(self, entry: ModelEntry):
        from .convert.model_cache import prepare_model_dir
        from .engine.encoder import EncoderEngine, EncoderModel, EncoderOptions
        from .engine.layout import usable_cores

        settings, options = self.settings, entry.options
        compute_type = options.get("compute_type") or settings.get("LLM_COMPUTE_TYPE")
        source = entry.path
        if source == PACKAGED:
            from .engine.default_model import prepare_default_embedding

            source = prepare_default_embedding(settings.get("LLM_CACHE_DIR"))
        path = prepare_model_dir(source, settings.get("LLM_CACHE_DIR"), compute_type)
        threads = int(options.get("threads") or settings.get("LLM_ENCODER_THREADS") or settings.get("LLM_CORES")
                      or usable_cores())
        model = EncoderModel(path, EncoderOptions(
            device=settings.get("LLM_DEVICE") or "auto", compute_type=compute_type,
            inter_threads=int(options.get("replicas") or 1), intra_threads=threads,
            pooling=options.get("pooling"), normalize=options.get("normalize"),
        ))
        if model.kind != entry.kind:
            model.close()
            raise ModelLoadError(f"LLM_MODELS[{entry.id!r}] is declared {entry.kind}, but {entry.path} is an "
                                 f"{model.kind} model")
        log.info("%s model %r ready (%s, %d thread(s))", entry.kind, entry.id, path, threads)
        return EncoderEngine(model, EncoderOptions(
            max_batch_size=settings.get("LLM_ENCODER_MAX_BATCH_SIZE") or 32,
            max_batch_tokens=settings.get("LLM_ENCODER_MAX_BATCH_TOKENS") or 8192,
            max_queue=settings.get("LLM_ENCODER_MAX_QUEUE") or 4096,
        ))

    def start_loading(self) -> None:
        """Load every encoder in the background (eager start); returns at once."""
        if self._loading or not self.entries:
            return
        self._loading = True

        def load() -> None:
            for model_id in self.entries:
                try:
                    self.encoder(model_id)
                except Exception:  # logged once by encoder(); its requests get 503
                    pass

        from .engine.handoff import NativeThread, gevent_patched

        if gevent_patched():
            import gevent

            gevent.spawn(load)
        else:
            NativeThread(load, "llm-encoder-preloader").start()

    def shutdown(self, timeout: float = 10.0) -> bool:
        """Stop the encoders; False when a native call was still running after ``timeout``."""
        self.closed = True
        stopped = True
        for entry in self.entries.values():
            engine, entry.engine = entry.engine, None
            if engine is not None:
                stopped = engine.shutdown(timeout) and stopped
                engine.model.close()
        return stopped
