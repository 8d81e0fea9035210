"""Operational routes: liveness, readiness, Prometheus metrics. Cheap, never queued behind generation."""

from __future__ import annotations

import hmac

from flask import Blueprint, Response, request

from .. import metrics
from ..schemas.response_bodies import Status
from .common import json_response, runtime
from .openapi import documented


@documented("healthz", Status)
def healthz():
    return json_response({"status": "ok"})


@documented("readyz", Status, errors=(503,), error=Status)
def readyz():
    rt = runtime()
    engine = rt.engine_if_loaded
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
        if rt.registry.entries:  # readiness is the chat model's; the others' states are shown beside it
            body["models"] = rt.registry.status()
        return json_response(body)
    body = {"status": status, "model": rt.model_id}
    if status == "load failed":
        body["error"] = rt.load_error
    if rt.registry.entries:
        body["models"] = rt.registry.status()
    return json_response(body, status=503)


def metrics_view():
    token = runtime().settings["LLM_METRICS_TOKEN"]
    if token:
        given = request.headers.get("Authorization", "")[7:].strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            return Response("metrics token required\n", status=401, mimetype="text/plain",
                            headers={"WWW-Authenticate": "Bearer"})
    for model_id, engine in runtime().registry.loaded():
        metrics.drain_encoder(model_id, engine)
    body, content_type = metrics.render(runtime().engine_if_loaded)
    return Response(body, mimetype=content_type.split(";")[0], headers={"Content-Type": content_type})


def register(bp: Blueprint) -> None:
    bp.add_url_rule("/healthz", "healthz", healthz, methods=["GET"])
    bp.add_url_rule("/readyz", "readyz", readyz, methods=["GET"])
    bp.add_url_rule("/metrics", "metrics", metrics_view, methods=["GET"])
