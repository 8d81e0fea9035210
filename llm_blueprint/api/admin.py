"""Operators' routes: load and unload chat models (``LLM_ADMIN_KEYS``; off without them).

``GET /admin/models``: every chat model's state. ``POST /admin/models/<id>/load``: load it now (making room as a
request would; a model whose load failed is tried again). ``POST /admin/models/<id>/unload``: unload it, 409 while
it is generating. Answers are OpenAI-style JSON; the keys are the admin keys, never the API keys (an API key
is a 401 here).
"""

from __future__ import annotations

from flask import Blueprint, request

from ..errors import AdminRoutesOff, ModelInUse, ModelNotFound, Unauthorized
from .admission import key_matches
from .common import json_response, runtime
from .errors import error_envelope


def _admin() -> None:
    keys = runtime().settings["LLM_ADMIN_KEYS"]
    if not keys:
        raise AdminRoutesOff()
    header = request.headers.get("Authorization", "")
    given = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key")
    if not key_matches(given, keys):
        raise Unauthorized("An admin key is required (LLM_ADMIN_KEYS).")


def _chat_model(model_id: str):
    rt = runtime()
    if model_id not in rt.chat.models:
        raise ModelNotFound(model_id, "', '".join(rt.chat.ids()))
    return rt.chat.models[model_id]


def _state(model) -> dict:
    return {"id": model.id, "object": "model", **model.status()}


@error_envelope("openai")
def admin_models():
    _admin()
    return json_response({"object": "list", "data": [_state(m) for m in runtime().chat.models.values()]})


@error_envelope("openai")
def admin_load(model_id: str):
    _admin()
    model = _chat_model(model_id)
    model.retry_after_failure()
    model.load()  # off the event loop, making room as a request would
    return json_response(_state(model))


@error_envelope("openai")
def admin_unload(model_id: str):
    _admin()
    model = _chat_model(model_id)
    if model.engine_if_loaded is not None:
        with runtime().chat.room:
            unloaded = model.unload("admin")
        if not unloaded:
            raise ModelInUse(f"the model {model_id!r} is generating; unload it when its requests are done",
                             code="model_busy")
    return json_response(_state(model))


def register(bp: Blueprint) -> None:
    bp.add_url_rule("/admin/models", "admin_models", admin_models, methods=["GET"])
    bp.add_url_rule("/admin/models/<llm_model_id:model_id>/load", "admin_load", admin_load, methods=["POST"])
    bp.add_url_rule("/admin/models/<llm_model_id:model_id>/unload", "admin_unload", admin_unload, methods=["POST"])
