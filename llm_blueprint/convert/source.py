"""One interface over the places a model's weights come from.

A :class:`ModelSource` shows its model the way Hugging Face ``transformers``
holds it: a :class:`DecoderConfig`, tensors under their Hugging Face names in
their Hugging Face layout (float32; the one exception, Q/K rows kept in the
interleaved rotary layout, is announced by ``config.rotary_interleave``), and
the tokenizer written as Hugging Face files. A GGUF file is translated back to
that view (llama.cpp's converter run in reverse); a Hugging Face folder
already is it. The spec builders only ever see this view.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass

import numpy as np

from ..errors import ConversionError
from .model_config import DecoderConfig


@dataclass
class Vocabulary:
    """Token strings by id (as many as the embedding has rows) and the special tokens' texts."""

    tokens: list[str]
    bos: str | None = None
    eos: str | None = None
    unk: str | None = None


class ModelSource(abc.ABC):
    """A model to convert: its hyperparameters, its tensors and its tokenizer."""

    path: str
    config: DecoderConfig
    format: str  # "gguf" or "huggingface"

    @abc.abstractmethod
    def has_tensor(self, name: str) -> bool:
        """Whether the model has tensor ``name`` (a Hugging Face name)."""

    @abc.abstractmethod
    def tensor(self, name: str) -> np.ndarray:
        """Tensor ``name`` (a Hugging Face name) as float32 in Hugging Face's layout, read now."""

    @abc.abstractmethod
    def write_tokenizer_files(self, out_dir: str) -> Vocabulary:
        """Write the tokenizer, ``tokenizer_config.json`` (chat template included) and
        ``generation_config.json`` into ``out_dir``; return the vocabulary."""

    def close(self) -> None:  # noqa: B027 - optional hook, most sources hold nothing to release
        """Release open files (memory maps)."""


def is_ctranslate2_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model.bin")) and os.path.isfile(os.path.join(path, "config.json"))


def fit_to_embeddings(tokens: list[str | None], vocab_size: int, path: str) -> list[str]:
    """One unique string per embedding row: gaps and rows past the tokenizer get placeholders (``<extra_id_N>``)."""
    if len(tokens) > vocab_size:
        if any(t is not None for t in tokens[vocab_size:]):
            extra = len(tokens) - vocab_size
            raise ConversionError(f"{path}: the tokenizer has {extra} more tokens than the embeddings have rows")
        tokens = tokens[:vocab_size]
    taken = {t for t in tokens if t is not None}
    out: list[str] = []
    for i in range(vocab_size):
        token = tokens[i] if i < len(tokens) else None
        if token is None:
            token = f"<extra_id_{i}>"
            while token in taken:
                token = "<" + token + ">"
            taken.add(token)
        out.append(token)
    return out
