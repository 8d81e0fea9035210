"""llm-blueprint: serve a local LLM from a Flask app over the OpenAI and Anthropic HTTP APIs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .extension import LLM

from .version import __version__

__all__ = ["LLM", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that ``llm_blueprint.gunicorn_conf`` loads nothing else of the package:
    # prometheus_client must first be imported after it set PROMETHEUS_MULTIPROC_DIR.
    if name == "LLM":
        from .extension import LLM

        return LLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
