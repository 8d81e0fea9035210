"""GGUF → CTranslate2 conversion without torch.

``gguf`` reads and dequantizes, :mod:`ctranslate2.specs` describes the model,
``Converter.convert`` quantizes and saves. The result is the same standard
directory ``ct2-transformers-converter`` writes (``model.bin``,
``config.json``, ``vocabulary.json``, tokenizer files), written atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import ctranslate2

from ..errors import ConversionError
from .gguf_file import open_gguf
from .model_specs import SPEC_BUILDERS, context_length
from .tokenizer_files import write_tokenizer_files

QUANTIZATIONS = ("int8", "int8_float16", "int8_float32", "int8_bfloat16", "float16", "bfloat16", "float32")
METADATA_FILE = "llm_blueprint.json"
CONVERTER_VERSION = 1


class _SpecConverter(ctranslate2.converters.Converter):
    def __init__(self, spec):
        self._spec = spec

    def _load(self):
        return self._spec


def convert_gguf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    quantization: str = "int8",
    force: bool = False,
    show_progress: bool = True,
) -> str:
    """Convert ``gguf_path`` into a CTranslate2 model directory at ``out_dir``.

    The directory appears whole or not at all: everything is written into a
    temporary sibling directory that is renamed into place at the end.
    """
    if quantization not in QUANTIZATIONS:
        raise ConversionError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not force:
        raise ConversionError(f"output directory {out_dir} already exists (use --force to replace it)")
    gguf = open_gguf(gguf_path)

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".tmp", dir=parent)
    try:
        spec = SPEC_BUILDERS[gguf.architecture](gguf, show_progress=show_progress)
        model_dir = os.path.join(staging, "model")
        n_ctx = context_length(gguf)
        tokenizer_dir = os.path.join(staging, "tokenizer")
        os.makedirs(tokenizer_dir)
        specials = write_tokenizer_files(gguf, tokenizer_dir, n_ctx)
        tokens = specials.pop("tokens")
        if len(tokens) != spec.get_vocabulary_size():
            raise ConversionError(
                f"{gguf.path}: vocabulary has {len(tokens)} tokens but the embeddings have "
                f"{spec.get_vocabulary_size()} rows"
            )
        spec.register_vocabulary(tokens)
        spec.config.bos_token = specials["bos"] or tokens[0]
        spec.config.eos_token = specials["eos"] or tokens[0]
        spec.config.unk_token = specials["unk"] or tokens[0]
        _SpecConverter(spec).convert(model_dir, quantization=quantization, force=True)
        for name in os.listdir(tokenizer_dir):
            shutil.move(os.path.join(tokenizer_dir, name), os.path.join(model_dir, name))
        with open(os.path.join(model_dir, METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump(
                {
                    "converter_version": CONVERTER_VERSION,
                    "source": os.path.basename(gguf.path),
                    "architecture": gguf.architecture,
                    "model_name": gguf.field("general.name"),
                    "context_length": n_ctx,
                    "quantization": quantization,
                },
                f,
                indent=2,
            )
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(model_dir, out_dir)
    except ConversionError:
        raise
    except MemoryError as exc:
        raise ConversionError(f"out of memory while converting {gguf.path}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
