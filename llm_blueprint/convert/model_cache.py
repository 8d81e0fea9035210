"""Models converted once into a cache directory, so a ``.gguf`` file or a Hugging Face
folder can be served directly.

The cache entry is named after the source and a fingerprint of its files
(path, sizes, modification times), the quantization and the converter version:
a changed file gets a fresh conversion. Several processes starting at once
(gunicorn workers) serialize on a file lock, and the converter writes under a
temporary name and renames, so a reader never sees a half-written directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re

from filelock import FileLock

from ..errors import ModelLoadError
from . import convert_model
from .common import CONVERTER_VERSION, METADATA_FILE
from .source import is_ctranslate2_dir

log = logging.getLogger(__name__)

FLOAT_QUANTIZATIONS = {"float32": "float32", "float16": "float16", "bfloat16": "float32"}


def default_cache_dir() -> str:
    from platformdirs import user_cache_dir

    return os.environ.get("LLM_CACHE_DIR") or user_cache_dir("llm-blueprint")


def quantization_for(compute_type: str | None) -> str:
    """The weight type to store for ``compute_type``: float compute types keep float weights, the rest int8."""
    return FLOAT_QUANTIZATIONS.get(compute_type or "", "int8")


def is_model_source(path: str) -> bool:
    """A ``.gguf`` file, or a folder with a Hugging Face ``config.json`` and no ``model.bin``."""
    if os.path.isfile(path):
        return True
    if not os.path.isdir(path) or is_ctranslate2_dir(path):
        return False
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return "model_type" in json.load(f)
    except (OSError, ValueError, TypeError):
        return False


def check_model_path(path: str, setting: str = "LLM_MODEL_PATH") -> None:
    """Raise :class:`ModelLoadError`, naming ``setting`` and the path as given, unless ``path`` is something a model
    can be loaded from: a CTranslate2 directory, a ``.gguf`` file or a Hugging Face folder. Cheap: no weight is read."""
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(full):
        raise ModelLoadError(f"{setting}={path}: no such file or directory")
    if not os.access(full, os.R_OK):
        raise ModelLoadError(f"{setting}={path}: not readable by this process (user {os.getuid()})")
    if os.path.isfile(full) and not full.lower().endswith(".gguf"):
        raise ModelLoadError(f"{setting}={path}: a file, but not a .gguf file (give a .gguf file, a CTranslate2 model "
                             "directory or a Hugging Face model folder)")
    if os.path.isdir(full) and not (is_ctranslate2_dir(full) or is_model_source(full)):
        raise ModelLoadError(f"{setting}={path}: a directory, but neither a CTranslate2 model (model.bin and "
                             "config.json) nor a Hugging Face model folder (config.json with a model_type)")


def source_fingerprint(path: str, quantization: str) -> str:
    """A digest of what a conversion of ``path`` depends on."""
    path = os.path.abspath(path)
    if os.path.isfile(path):
        files = [path]
    else:
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
    stats = [(os.path.basename(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    key = json.dumps([path, quantization, CONVERTER_VERSION, stats])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def convert_once(source: str, target: str, quantization: str, show_progress: bool = True) -> str:
    """Convert ``source`` into ``target`` unless a finished conversion is already there."""
    marker = os.path.join(target, METADATA_FILE)
    if os.path.isfile(marker):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with FileLock(target + ".lock"):
        if not os.path.isfile(marker):  # another process may have finished meanwhile
            log.info("converting %s into %s (%s), once", source, target, quantization)
            convert_model(source, target, quantization=quantization, force=True, show_progress=show_progress)
    return target


def prepare_model_dir(path: str, cache_dir: str | None = None, compute_type: str | None = None,
                      show_progress: bool = True) -> str:
    """Map a user's model path to a CTranslate2 model directory.

    A CTranslate2 directory is used as it is; a ``.gguf`` file or a Hugging
    Face folder is converted into ``cache_dir`` the first time and found there
    afterwards. Anything else is returned unchanged for the loader to report.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if not is_model_source(path):
        return path
    quantization = quantization_for(compute_type)
    name = os.path.basename(path.rstrip(os.sep))
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name[:-5] if name.lower().endswith(".gguf") else name)
    target = os.path.join(cache_dir or default_cache_dir(), f"{name}-{quantization}-{source_fingerprint(path, quantization)}")
    return convert_once(path, target, quantization, show_progress)
