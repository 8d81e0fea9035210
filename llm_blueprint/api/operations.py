"""Operational routes: liveness, readiness, Prometheus metrics. Cheap, never queued behind generation."""

from __future__ import annotations

import hmac

from flask import Blueprint, Response, request

from .. import metrics
from ..schemas.response_bodies import Status
from .common import json_response, runtime
from .openapi import documented


class _Unloaded:
    """The default model's engine after an unload: ready (it loads again on its next request), nothing queued."""

    alive = True
    queued = running = 0


@documented("healthz", Status)
def healthz():
    return json_response({"status": "ok"})


@documented("readyz", Status, errors=(503,), error=Status)
def readyz():
    rt = runtime()
    engine = rt.engine_if_loaded
    if engine is None and rt.default.loaded_once and rt.load_error is None:
        engine = _Unloaded  # unloaded since (LLM_MAX_LOADED_MODELS): loads on its next request (unless that failed)
    if engine is None and not rt.draining and rt.load_error is None:
        rt.start_loading()  # lazy mode: readiness converges without waiting for traffic (a failed load waits for a request)
    if rt.draining:
        status = "draining"
    elif engine is None:
        status = "load failed" if rt.load_error and not rt.loading else "loading"
    elif not engine.alive:
        status = "engine stopped"
    else:
        body = {"status": "ready", "model": rt.model_id, "queued": engine.queued, "running": engine.running}
        _other_models(rt, body)
        return json_response(body)
    body = {"status": status, "model": rt.model_id}
    if status == "load failed":
        body["error"] = rt.load_error
    _other_models(rt, body)
    return json_response(body, status=503)


def _other_models(rt, body: dict) -> None:
    """Readiness is the default chat model's; the other models' states are shown beside it."""
    states = {m.id: m.status() for m in rt.chat.models.values() if m is not rt.default}
    states.update(rt.registry.status())
    if states:
        body["models"] = states


def metrics_view():
    token = runtime().settings["LLM_METRICS_TOKEN"]
    if token:
        given = request.headers.get("Authorization", "")[7:].strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            return Response("metrics token required\n", status=401, mimetype="text/plain",
                            headers={"WWW-Authenticate": "Bearer"})
    for model_id, engine in runtime().registry.loaded():
        metrics.drain_encoder(model_id, engine)
    chat = runtime().chat
    engines = [(m.id, m.engine_if_loaded) for m in chat.loaded()]
    body, content_type = metrics.render([(model_id, engine) for model_id, engine in engines if engine is not None],
                                        chat.cores.waits if chat.cores is not None else 0, chat.memory)
    return Response(body, mimetype=content_type.split(";")[0], headers={"Content-Type": content_type})


def register(bp: Blueprint) -> None:
    bp.add_url_rule("/healthz", "healthz", healthz, methods=["GET"])
    bp.add_url_rule("/readyz", "readyz", readyz, methods=["GET"])
    bp.add_url_rule("/metrics", "metrics", metrics_view, methods=["GET"])
