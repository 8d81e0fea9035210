"""Encoder models (embeddings, cross-encoder reranking) and the batcher that runs them on native threads.

An :class:`EncoderModel` is a converted BERT-family directory (convert/encoder_specs.py): the CTranslate2
encoder, its ``tokenizer.json``, its pooling (``encoder.json``, from the sentence-transformers files) and, for a
cross-encoder, its classification head (``head.npz``, applied here in numpy after the encoder).

An :class:`EncoderEngine` batches the inputs of concurrent requests: every input waits in one queue; a native
worker per replica takes the oldest input plus the queued ones closest to it in length (so padding stays small), up
to ``max_batch_size`` inputs and ``max_batch_tokens`` padded tokens, runs one ``forward_batch`` and pools each row
on the worker. The request's greenlet (or thread) waits on a :class:`~.handoff.Channel`, never blocking the hub.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..convert.encoder_source import POOLING_MODES
from ..convert.encoder_specs import ENCODER_METADATA, HEAD_FILE
from ..errors import EngineShutDown, GenerationFailed, InvalidRequest, ModelLoadError, Overloaded
from .handoff import Channel, NativeThread, WorkQueue, allocate_native_lock, native_sleep
from .model import DEFAULT_COMPUTE_TYPES, resolve_device

log = logging.getLogger(__name__)



def is_encoder_dir(path: str) -> bool:
    """A converted encoder directory (embedding model or cross-encoder)."""
    return os.path.isfile(os.path.join(path, ENCODER_METADATA)) and os.path.isfile(os.path.join(path, "model.bin"))


def encoder_kind(path: str) -> str:
    """``embedding`` or ``rerank``, as the converted directory says."""
    with open(os.path.join(path, ENCODER_METADATA), encoding="utf-8") as f:
        return json.load(f)["kind"]


@dataclass
class EncoderOptions:
    """How to load and batch an encoder. ``None`` means "as the model says" / "decide from the machine"."""

    device: str = "auto"
    compute_type: str | None = None
    inter_threads: int = 1
    intra_threads: int = 0
    pooling: str | None = None  # override of the model's pooling: mean, cls, last, max, mean_sqrt_len
    normalize: bool | None = None  # override of the model's normalisation
    max_batch_size: int = 32  # inputs per forward pass
    max_batch_tokens: int = 8192  # padded tokens per forward pass (inputs x longest input)
    max_queue: int = 4096  # inputs waiting beyond which requests are refused (429)
    gather_seconds: float = 0.002  # how long a worker waits for companions after an arrival


@dataclass(frozen=True)
class EncodedInput:
    """One tokenized input: token ids with special tokens, and token type ids (None: all zero)."""

    ids: list[int]
    type_ids: list[int] | None = None


class EncoderModel:
    """A loaded encoder directory. Thread-safe for concurrent forward calls."""

    def __init__(self, path: str, options: EncoderOptions | None = None):
        import ctranslate2
        from tokenizers import Tokenizer

        options = options or EncoderOptions()
        self.path = os.path.abspath(path)
        if not is_encoder_dir(self.path):
            raise ModelLoadError(f"{self.path}: not a converted encoder directory (no {ENCODER_METADATA} or model.bin)")
        with open(os.path.join(self.path, ENCODER_METADATA), encoding="utf-8") as f:
            self.metadata: dict[str, Any] = json.load(f)
        self.kind: str = self.metadata["kind"]
        self.family: str = self.metadata["family"]
        self.hidden_size = int(self.metadata["hidden_size"])
        self.max_length = int(self.metadata["max_length"])
        self.uses_token_types = int(self.metadata.get("token_types") or 0) > 1
        self.pooling = options.pooling or self.metadata["pooling"]
        if self.pooling not in POOLING_MODES:
            raise ModelLoadError(f"unknown pooling {self.pooling!r}; choose one of {', '.join(POOLING_MODES)}")
        self.normalize = self.metadata["normalize"] if options.normalize is None else bool(options.normalize)
        self.head_kind: str | None = self.metadata.get("head")
        self.labels: list[str] = list(self.metadata.get("labels") or [])
        self.head: dict[str, np.ndarray] = {}
        if self.head_kind:
            with np.load(os.path.join(self.path, HEAD_FILE)) as stored:
                self.head = {name: np.asarray(stored[name], dtype=np.float32) for name in stored.files}
        self.tokenizer = Tokenizer.from_file(os.path.join(self.path, "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.device = resolve_device(options.device)
        self.compute_type = options.compute_type or DEFAULT_COMPUTE_TYPES[self.device]
        self.inter_threads = max(1, options.inter_threads)
        self.intra_threads = options.intra_threads
        try:
            self.encoder = ctranslate2.Encoder(self.path, device=self.device, compute_type=self.compute_type,
                                               inter_threads=self.inter_threads, intra_threads=self.intra_threads)
        except (RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"CTranslate2 cannot load {self.path} on {self.device}/{self.compute_type}: {exc}") from exc
        log.info("loaded encoder %s (%s, %s) on %s (%s), %d tokens per input, pooling %s%s", self.path, self.family,
                 self.kind, self.device, self.compute_type, self.max_length, self.pooling,
                 " + normalize" if self.normalize else "")

    # Tokenizing (on the request's greenlet: microseconds per input) --------------
    def encode_texts(self, texts: list[str], truncate: int | None, param: str) -> list[EncodedInput]:
        """``texts`` with the model's special tokens. Longer than the model takes (or than ``truncate`` tokens) is a
        400 unless ``truncate`` is given, which cuts the text (special tokens kept)."""
        limit = self._limit(truncate, param)
        specials = self.tokenizer.num_special_tokens_to_add(False)
        encoded = []
        for i, encoding in enumerate(self.tokenizer.encode_batch(texts, add_special_tokens=False)):
            if len(encoding.ids) + specials > limit:
                if truncate is None:
                    raise self._too_long(len(encoding.ids) + specials, f"{param}[{i}]" if len(texts) > 1 else param)
                encoding.truncate(max(0, limit - specials))
            encoded.append(self._inputs(self.tokenizer.post_process(encoding)))
        return encoded

    def encode_pairs(self, query: str, documents: list[str], truncate: int | None) -> list[EncodedInput]:
        """(query, document) pairs as a cross-encoder reads them. A pair too long is a 400 unless ``truncate`` is
        given, which shortens the document (then the query, if it alone is too long)."""
        limit = self._limit(truncate, "documents")
        specials = self.tokenizer.num_special_tokens_to_add(True)
        query_encoding = self.tokenizer.encode(query, add_special_tokens=False)
        encoded = []
        for i, document in enumerate(self.tokenizer.encode_batch(documents, add_special_tokens=False)):
            total = len(query_encoding.ids) + len(document.ids) + specials
            first = query_encoding
            if total > limit:
                if truncate is None:
                    raise self._too_long(total, f"documents[{i}]", " (the query and this document together)")
                room = limit - specials
                document.truncate(max(0, room - len(query_encoding.ids)))
                if len(query_encoding.ids) > room - len(document.ids):
                    first = self.tokenizer.encode(query, add_special_tokens=False)
                    first.truncate(max(0, room - len(document.ids)))
            encoded.append(self._inputs(self.tokenizer.post_process(first, document)))
        return encoded

    def token_inputs(self, sequences: list[list[int]], truncate: int | None, param: str) -> list[EncodedInput]:
        """Token id inputs, taken as they are (no special tokens added), checked against the vocabulary."""
        limit = self._limit(truncate, param)
        inputs = []
        for i, ids in enumerate(sequences):
            where = f"{param}[{i}]" if len(sequences) > 1 else param
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise InvalidRequest(f"token ids must be between 0 and {self.vocab_size - 1}", param=where)
            if len(ids) > limit:
                if truncate is None:
                    raise self._too_long(len(ids), where)
                ids = ids[:limit]
            inputs.append(EncodedInput(list(ids)))
        return inputs

    def _limit(self, truncate: int | None, param: str) -> int:
        if truncate is None or truncate < 0:
            return self.max_length
        if truncate == 0:
            raise InvalidRequest("truncate_prompt_tokens must be at least 1 (or -1: the model's limit)",
                                 param="truncate_prompt_tokens")
        return min(truncate, self.max_length)

    def _too_long(self, tokens: int, param: str, what: str = "") -> InvalidRequest:
        return InvalidRequest(f"{param} has {tokens} tokens{what}, but this model takes at most {self.max_length} "
                              "tokens per input; shorten it, or send truncate_prompt_tokens to cut it",
                              param=param, code="context_length_exceeded")

    def _inputs(self, encoding) -> EncodedInput:
        return EncodedInput(list(encoding.ids), list(encoding.type_ids) if self.uses_token_types else None)

    # On native threads ----------------------------------------------------------
    def forward(self, batch: list[EncodedInput]) -> np.ndarray:
        """Last hidden states, ``[len(batch), longest, hidden]`` float32 (rows past an input's length are padding)."""
        type_ids = None
        if self.uses_token_types:
            longest = max(len(item.ids) for item in batch)
            type_ids = [(item.type_ids or [0] * len(item.ids)) + [0] * (longest - len(item.ids)) for item in batch]
            # CTranslate2 wants type ids as wide as the padded batch
        output = self.encoder.forward_batch([item.ids for item in batch], token_type_ids=type_ids)
        states = output.last_hidden_state
        if self.device != "cpu":
            import ctranslate2

            states = states.to_device(ctranslate2.Device.cpu)
        return np.asarray(states, dtype=np.float32)

    def pool(self, states: np.ndarray) -> np.ndarray:
        """One input's embedding from its token states ``[length, hidden]``."""
        if self.pooling == "cls":
            vector = states[0]
        elif self.pooling == "last":
            vector = states[-1]
        elif self.pooling == "max":
            vector = states.max(axis=0)
        elif self.pooling == "mean_sqrt_len":
            vector = states.sum(axis=0) / np.sqrt(len(states))
        else:
            vector = states.mean(axis=0)
        vector = np.asarray(vector, dtype=np.float32)
        if self.normalize:
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        return vector

    def classify(self, first_states: np.ndarray) -> np.ndarray:
        """The classification head's logits ``[n, labels]`` from the first token's states ``[n, hidden]``."""
        h = self.head
        x = np.asarray(first_states, dtype=np.float32)
        if self.head_kind == "bert":  # BertPooler (dense + tanh), then the classifier
            x = np.tanh(x @ h["pooler.dense.weight"].T + h["pooler.dense.bias"])
            return x @ h["classifier.weight"].T + h["classifier.bias"]
        if self.head_kind == "roberta":  # RobertaClassificationHead: dense + tanh, out_proj
            x = np.tanh(x @ h["classifier.dense.weight"].T + h["classifier.dense.bias"])
            return x @ h["classifier.out_proj.weight"].T + h["classifier.out_proj.bias"]
        if self.head_kind == "distilbert":  # pre_classifier + ReLU, classifier
            x = np.maximum(x @ h["pre_classifier.weight"].T + h["pre_classifier.bias"], 0)
            return x @ h["classifier.weight"].T + h["classifier.bias"]
        raise InvalidRequest(f"this model has no classification head (it is an {self.kind} model)", param="model")

    def close(self) -> None:
        encoder = getattr(self, "encoder", None)
        if encoder is not None:
            del self.encoder


def relevance(logits: np.ndarray) -> np.ndarray:
    """A cross-encoder's relevance score per row: the sigmoid of its one logit (as sentence-transformers'
    ``CrossEncoder`` and vLLM give it), or the probability of the last label of several (softmax)."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape[1] == 1:
        return 1.0 / (1.0 + np.exp(-logits[:, 0]))
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted[:, -1] / shifted.sum(axis=1)


# ----------------------------------------------------------------------------- batching
class _Job:
    def __init__(self, inputs: list[EncodedInput], classify: bool):
        self.inputs = inputs
        self.classify = classify
        self.results: list[Any] = [None] * len(inputs)
        self.remaining = len(inputs)
        self.cancelled = False
        self.failed = False
        self.channel = Channel()
        self.lock = allocate_native_lock()
        self.enqueued_at = time.monotonic()


@dataclass
class _Item:
    job: _Job
    index: int
    length: int
    order: int


class EncoderEngine:
    """Batches the inputs of concurrent requests onto one :class:`EncoderModel` (see the module's docstring)."""

    def __init__(self, model: EncoderModel, options: EncoderOptions | None = None):
        self.model = model
        self.options = options or EncoderOptions()
        self._pending: list[_Item] = []
        self._lock = allocate_native_lock()
        self._wakeup = WorkQueue()
        self._order = 0
        self._closed = False
        self.batch_sizes: list[int] = []  # every forward pass, for tests and metrics
        self._threads = [NativeThread(self._worker, f"llm-encoder-{i}") for i in range(model.inter_threads)]
        for thread in self._threads:
            thread.start()

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def alive(self) -> bool:
        return not self._closed and all(t.alive for t in self._threads)

    def embed(self, inputs: list[EncodedInput]) -> list[np.ndarray]:
        """Each input's pooled (and, if the model says so, normalised) embedding."""
        return self._run(inputs, classify=False)

    def logits(self, inputs: list[EncodedInput]) -> np.ndarray:
        """Each input's classification logits ``[n, labels]`` (a cross-encoder's (query, document) pairs)."""
        if not self.model.head_kind:
            raise InvalidRequest("this model has no classification head", param="model")
        return np.stack(self._run(inputs, classify=True)) if inputs else np.zeros((0, 1), np.float32)

    def _run(self, inputs: list[EncodedInput], classify: bool) -> list[Any]:
        if self._closed:
            raise EngineShutDown("the engine is shutting down")
        if not inputs:
            return []
        if any(not item.ids for item in inputs):
            raise InvalidRequest("an input is empty", param="input")
        job = _Job(inputs, classify)
        with self._lock:
            if len(self._pending) + len(inputs) > self.options.max_queue:
                raise Overloaded(f"{len(self._pending)} inputs are already waiting; retry shortly", retry_after=1)
            for index, item in enumerate(inputs):
                self._order += 1
                self._pending.append(_Item(job, index, len(item.ids), self._order))
        for _ in self._threads:
            self._wakeup.put(True)
        try:
            ok, value = job.channel.get()
        finally:
            job.cancelled = True  # no-op when done; drops its waiting inputs otherwise (the caller is gone)
        if not ok:
            raise value
        return value

    def shutdown(self, timeout: float = 10.0) -> bool:
        if self._closed:
            return True
        self._closed = True
        with self._lock:
            waiting, self._pending = self._pending, []
        for job in {id(item.job): item.job for item in waiting}.values():
            self._fail(job, EngineShutDown("the engine is shutting down"))
        for _ in self._threads:
            self._wakeup.put(None)
        deadline = time.monotonic() + timeout
        return all(t.join(max(0.0, deadline - time.monotonic())) for t in self._threads)

    # Native threads ------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            if self._wakeup.get() is None:
                return
            if self.options.gather_seconds > 0:
                native_sleep(self.options.gather_seconds)
            while True:
                batch = self._take_batch()
                if not batch:
                    break
                self._forward(batch)

    def _take_batch(self) -> list[_Item]:
        """The oldest waiting input plus those closest to it in length, within the batch limits."""
        with self._lock:
            self._pending = [item for item in self._pending if not item.job.cancelled and not item.job.failed]
            if not self._pending:
                return []
            seed = self._pending[0]
            candidates = sorted(self._pending, key=lambda it: (abs(it.length - seed.length), it.order))
            batch: list[_Item] = []
            longest = 0
            for item in candidates:
                wider = max(longest, item.length)
                if batch and (len(batch) >= self.options.max_batch_size or wider * (len(batch) + 1) > self.options.max_batch_tokens):
                    break
                batch.append(item)
                longest = wider
            taken = {id(item) for item in batch}
            self._pending = [item for item in self._pending if id(item) not in taken]
        return batch

    def _forward(self, batch: list[_Item]) -> None:
        model = self.model
        batch.sort(key=lambda item: item.length)
        try:
            states = model.forward([item.job.inputs[item.index] for item in batch])
            self.batch_sizes.append(len(batch))
            heads = [k for k, item in enumerate(batch) if item.job.classify]
            logits = dict(zip(heads, model.classify(states[heads, 0]), strict=True)) if heads else {}
            for k, item in enumerate(batch):
                if item.job.classify:
                    result = logits[k]
                else:
                    result = model.pool(states[k, : item.length])
                self._deliver(item, result)
        except Exception as exc:  # the engine failing: every request of the batch gets the error
            log.exception("encoder forward failed")
            for job in {id(item.job): item.job for item in batch}.values():
                self._fail(job, exc)

    def _deliver(self, item: _Item, result: Any) -> None:
        job = item.job
        job.results[item.index] = result
        with job.lock:
            job.remaining -= 1
            last = job.remaining == 0 and not job.failed
        if last:
            job.channel.put((True, job.results))

    def _fail(self, job: _Job, exc: Exception) -> None:
        with job.lock:
            if job.failed:
                return
            job.failed = True
        job.channel.put((False, exc if isinstance(exc, EngineShutDown) else GenerationFailed(str(exc))))
