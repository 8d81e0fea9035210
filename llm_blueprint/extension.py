"""The Flask extension: ``LLM(app)`` or ``LLM().init_app(app)``."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask

from .runtime import Runtime
from .settings import resolve

log = logging.getLogger("llm_blueprint")


class LLM:
    """Mounts the OpenAI/Anthropic-compatible API blueprint on a Flask app.

    Settings come from ``LLM_*`` keys in ``app.config`` (see
    :mod:`llm_blueprint.settings`); keyword arguments here win over them,
    e.g. ``LLM(app, LLM_URL_PREFIX="/llm")``. Per-app state lives in
    ``app.extensions["llm"]``; nothing is installed app-wide.
    """

    def __init__(self, app: Flask | None = None, **overrides: Any):
        self._overrides = overrides
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> Runtime:
        from .api import create_blueprint
        from .logs import configure

        settings = resolve(app.config, self._overrides)
        for key, value in settings.items():
            app.config.setdefault(key, value)
        runtime = Runtime(settings)
        app.extensions["llm"] = runtime
        app.register_blueprint(create_blueprint(settings), url_prefix=settings["LLM_URL_PREFIX"] or None)
        logger = configure(settings["LLM_LOG_JSON"])
        if not settings["LLM_API_KEYS"] and settings["LLM_AUTH_HOOK"] is None:
            logger.warning(
                "NO API KEYS CONFIGURED: the LLM API under %r is open to anyone who can reach this server; "
                "set LLM_API_KEYS, LLM_API_KEYS_FILE or LLM_AUTH_HOOK", settings["LLM_URL_PREFIX"] or "/")
        if settings["LLM_EAGER_LOAD"]:
            if settings["LLM_MODEL_PATH"]:  # a start that can never serve stops here, naming the setting and path
                from .convert.model_cache import check_model_path

                check_model_path(settings["LLM_MODEL_PATH"])
            runtime.start_loading()  # in the background: the worker boots and answers /healthz meanwhile
        return runtime

    @staticmethod
    def runtime(app: Flask) -> Runtime:
        """The app's :class:`Runtime` (model, engine, settings)."""
        return app.extensions["llm"]
