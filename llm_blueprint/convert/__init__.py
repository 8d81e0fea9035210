"""GGUF file or Hugging Face folder → CTranslate2 model directory, without torch.

``gguf`` and ``safetensors`` read the weights (:mod:`.source` gives both one
interface), :mod:`.model_specs` describes the model to CTranslate2 one family
at a time and quantizes as it goes, and the spec is saved. The result is the
standard directory ``ct2-transformers-converter`` writes (``model.bin``,
``config.json``, ``vocabulary.json``, tokenizer files), written atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

from ..errors import ConversionError
from .common import CONVERTER_VERSION, METADATA_FILE, QUANTIZATIONS, check_quantization
from .gguf_source import GGUFSource
from .hf_folder import HFFolder
from .source import ModelSource, is_ctranslate2_dir

__all__ = ["CONVERTER_VERSION", "METADATA_FILE", "QUANTIZATIONS", "convert_gguf", "convert_model", "open_model_source"]


def open_model_source(path: str | os.PathLike) -> ModelSource:
    """Open a ``.gguf`` file or a Hugging Face model folder, checking it before any slow work."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if is_ctranslate2_dir(path):
            raise ConversionError(f"{path} is already a CTranslate2 model directory")
        return HFFolder.open(path)
    if os.path.isfile(path) or path.lower().endswith(".gguf"):
        return GGUFSource.open(path)
    raise ConversionError(f"model not found: {path} (expected a .gguf file or a Hugging Face model folder)")


@contextlib.contextmanager
def _ticking(what: str, enabled: bool):
    """A progress line that counts seconds while a step without progress of its own runs."""
    if not enabled:
        yield
        return
    import threading

    from tqdm import tqdm

    done = threading.Event()
    with tqdm(desc=what, unit="s", bar_format="{desc}: {n:.0f} s") as bar:
        def tick() -> None:
            while not done.wait(1.0):
                bar.update(1)

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()


def convert_model(
    source_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    quantization: str = "int8",
    force: bool = False,
    show_progress: bool = True,
) -> str:
    """Convert a ``.gguf`` file or a Hugging Face folder into a CTranslate2 model directory at ``out_dir``.

    The directory appears whole or not at all: everything is written into a
    temporary sibling directory that is renamed into place at the end.
    """
    from .model_specs import build_spec  # imports CTranslate2

    check_quantization(quantization)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not force:
        raise ConversionError(f"output directory {out_dir} already exists (use --force to replace it)")
    encoder = open_encoder_source(os.fspath(source_path))
    if encoder is not None:  # BERT family: embedding models and cross-encoders
        from .encoder_specs import convert_encoder

        return convert_encoder(encoder, out_dir, quantization)
    source = open_model_source(source_path)

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".tmp", dir=parent)
    try:
        model_dir = os.path.join(staging, "model")
        tokenizer_dir = os.path.join(staging, "tokenizer")
        os.makedirs(tokenizer_dir)
        vocabulary = source.write_tokenizer_files(tokenizer_dir)
        spec = build_spec(source, vocabulary, quantization, show_progress)
        os.makedirs(model_dir)
        with _ticking("writing model.bin", show_progress):  # CTranslate2 checks and writes every weight: most of the time
            spec.save(model_dir)
        del spec
        for name in os.listdir(tokenizer_dir):
            shutil.move(os.path.join(tokenizer_dir, name), os.path.join(model_dir, name))
        with open(os.path.join(model_dir, METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump(_metadata(source, quantization), f, indent=2)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(model_dir, out_dir)
    except ConversionError:
        raise
    except MemoryError as exc:
        raise ConversionError(f"out of memory while converting {source.path}") from exc
    finally:
        source.close()
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def open_encoder_source(path: str):
    """The encoder source at ``path`` (a Hugging Face BERT-family folder, or a GGUF file of llama.cpp's ``bert``
    architecture), or None when it is another kind of model."""
    if os.path.isdir(path):
        from .encoder_hf import is_encoder_folder, open_encoder_folder

        return open_encoder_folder(path) if is_encoder_folder(path) else None
    if path.lower().endswith(".gguf") and os.path.isfile(path):
        from .encoder_gguf import GGUFEncoder, gguf_encoder_kind

        return GGUFEncoder(path) if gguf_encoder_kind(path) else None
    return None


def _metadata(source: ModelSource, quantization: str) -> dict:
    config = source.config
    return {
        "converter_version": CONVERTER_VERSION,
        "source": os.path.basename(os.path.normpath(source.path)),
        "source_format": source.format,
        "family": config.family,
        "architecture": config.family,
        "model_name": config.name,
        "context_length": config.context_length,
        "quantization": quantization,
    }


# The name this function had when GGUF was the only source.
convert_gguf = convert_model
