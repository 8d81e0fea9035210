"""``/v1/embeddings`` (OpenAI's shape) and ``/v1/rerank`` + ``/rerank`` (the shape llama.cpp and vLLM serve), from
the embedding and rerank models of ``LLM_MODELS`` (registry.py).

Inputs are tokenized here, then wait on the model's :class:`~llm_blueprint.engine.encoder.EncoderEngine`, which
batches them with other requests' inputs on native threads; the request's greenlet only waits.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import numpy as np
from flask import Blueprint

from .. import metrics
from ..engine.encoder import relevance
from ..errors import InvalidRequest
from ..registry import EMBEDDING, RERANK
from ..schemas.common import load
from ..schemas.embeddings import EmbeddingList, EmbeddingRequestSchema, RerankRequestSchema, RerankResult
from .common import check_model, json_body, json_response, runtime
from .errors import error_envelope
from .openapi import OPENAI_ERRORS, documented

EMBEDDING_SCHEMA = EmbeddingRequestSchema()
RERANK_SCHEMA = RerankRequestSchema()


def _check_count(count: int, param: str) -> None:
    limit = runtime().settings["LLM_EMBEDDING_MAX_INPUTS"]
    if count > limit:
        raise InvalidRequest(f"at most {limit} {param} are allowed per request", param=param)


def _dimensions(model_id: str, requested: int | None, size: int) -> int | None:
    """How many leading dimensions to keep: None for all. Fewer only for a model declared trained for it
    (``LLM_MODELS`` option ``dimensions``: true, or the sizes it was trained for)."""
    if requested is None or requested == size:
        return None
    allowed = runtime().registry.entries[model_id].options.get("dimensions")
    fits = requested < size and (allowed is True or (isinstance(allowed, list) and requested in allowed))
    if not fits:
        if isinstance(allowed, list):
            sizes = ", ".join(str(d) for d in sorted(set(allowed) | {size}))
        else:
            sizes = f"at most {size}" if allowed is True else str(size)
        raise InvalidRequest(f"dimensions must be {sizes} for the model '{model_id}'", param="dimensions")
    return requested


def _encoded(vector: np.ndarray, encoding_format: str) -> Any:
    if encoding_format == "base64":  # what the openai SDK asks for by default, and decodes as float32
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


@error_envelope("openai")
@documented("createEmbedding", EmbeddingList, body=EmbeddingRequestSchema, errors=OPENAI_ERRORS)
def embeddings():
    data = load(EMBEDDING_SCHEMA, json_body())
    model_id = check_model(data.get("model"), kind=EMBEDDING)
    form, values = data["input"]
    _check_count(len(values), "input")
    engine = runtime().registry.encoder(model_id)
    model = engine.model
    keep = _dimensions(model_id, data.get("dimensions"), model.hidden_size)
    truncate = data.get("truncate_prompt_tokens")
    inputs = model.encode_texts(values, truncate, "input") if form == "text" else model.token_inputs(values, truncate, "input")
    started = time.monotonic()
    vectors = engine.embed(inputs)
    tokens = sum(len(item.ids) for item in inputs)
    metrics.observe_encoder(model_id, EMBEDDING, engine, len(inputs), tokens, time.monotonic() - started)
    if keep is not None:  # Matryoshka: the leading dimensions, back to unit length
        vectors = [v[:keep] / max(float(np.linalg.norm(v[:keep])), 1e-12) for v in vectors]
    encoding_format = data.get("encoding_format") or "float"
    return json_response({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": _encoded(v, encoding_format)} for i, v in enumerate(vectors)],
        "model": data.get("model") or model_id,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })


def _rerank():
    data = load(RERANK_SCHEMA, json_body())
    model_id = check_model(data.get("model"), kind=RERANK)
    documents = data["documents"]
    _check_count(len(documents), "documents")
    engine = runtime().registry.encoder(model_id)
    inputs = engine.model.encode_pairs(data["query"], documents, data.get("truncate_prompt_tokens"))
    started = time.monotonic()
    scores = relevance(engine.logits(inputs))
    tokens = sum(len(item.ids) for item in inputs)
    metrics.observe_encoder(model_id, RERANK, engine, len(inputs), tokens, time.monotonic() - started)
    order = sorted(range(len(documents)), key=lambda i: (-scores[i], i))[: data.get("top_n") or len(documents)]
    with_documents = data.get("return_documents") is not False
    results = [{"index": i, "relevance_score": float(scores[i]), **({"document": {"text": documents[i]}} if with_documents else {})}
               for i in order]
    return json_response({"id": f"rerank-{uuid.uuid4().hex}", "object": "list", "model": data.get("model") or model_id,
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "results": results})


# The same route under both paths it is known by (llama.cpp serves /rerank, vLLM both); one operation id each.
rerank = error_envelope("openai")(documented("rerank", RerankResult, body=RerankRequestSchema, errors=OPENAI_ERRORS)(_rerank))
rerank_v1 = error_envelope("openai")(documented("rerankV1", RerankResult, body=RerankRequestSchema,
                                                errors=OPENAI_ERRORS)(lambda: _rerank()))


def register(bp: Blueprint) -> None:
    bp.add_url_rule("/v1/embeddings", "openai_embeddings", embeddings, methods=["POST"])
    bp.add_url_rule("/v1/rerank", "rerank_v1", rerank_v1, methods=["POST"])
    bp.add_url_rule("/rerank", "rerank", rerank, methods=["POST"])
