"""What an encoder converter reads: BERT-family hyperparameters and tensors under canonical names.

An :class:`EncoderSource` shows its model as Hugging Face's ``BertModel`` holds
it, whatever the family or file: ``embeddings.word_embeddings.weight``,
``encoder.layer.{i}.attention.self.query.weight`` ... (no ``bert.``/``roberta.``
prefix), plus the sequence-classification head of a cross-encoder under its own
names (``classifier.*``, DistilBERT's ``pre_classifier.*``). RoBERTa's position
table keeps its first ``padding_idx + 1`` rows; ``config.position_offset`` says
how many to skip. The spec builder (:mod:`.encoder_specs`) only ever sees this view.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import numpy as np

# Families: how each applies its classification head after the encoder (see engine/encoder.py).
ENCODER_FAMILIES = {"bert": "BERT", "roberta": "RoBERTa", "xlm-roberta": "XLM-RoBERTa", "distilbert": "DistilBERT"}
POOLING_MODES = ("mean", "cls", "last", "max", "mean_sqrt_len")


@dataclass
class Pooling:
    """How token states become one embedding (sentence-transformers' ``1_Pooling/config.json``)."""

    mode: str = "mean"
    normalize: bool = True
    source: str = "default (no sentence-transformers files)"


@dataclass
class EncoderConfig:
    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_positions: int  # usable positions (the table's rows after the offset)
    layer_norm_eps: float
    activation: str  # "gelu", "gelu_tanh" or "relu"
    position_offset: int = 0
    token_types: int = 0  # rows of the token type table; 0 = none (DistilBERT)
    has_pooler: bool = False
    head: str | None = None  # "bert" (pooler + classifier), "roberta" (dense, tanh, out_proj), "distilbert"
    num_labels: int = 0
    labels: list[str] = field(default_factory=list)
    max_length: int = 0  # tokens per input, special tokens included (sentence-transformers' max_seq_length if smaller)
    pooling: Pooling = field(default_factory=Pooling)
    name: str = ""

    @property
    def kind(self) -> str:
        """What the model serves: ``rerank`` for a cross-encoder (a classification head), else ``embedding``."""
        return "rerank" if self.head else "embedding"


class EncoderSource(abc.ABC):
    """An encoder model to convert: hyperparameters, canonical tensors, tokenizer files."""

    path: str
    config: EncoderConfig
    format: str

    @abc.abstractmethod
    def has_tensor(self, name: str) -> bool:
        """Whether the model has tensor ``name`` (a canonical name)."""

    @abc.abstractmethod
    def tensor(self, name: str) -> np.ndarray:
        """Tensor ``name`` (a canonical name) as float32, read now."""

    @abc.abstractmethod
    def write_tokenizer_files(self, out_dir: str) -> list[str]:
        """Write ``tokenizer.json`` (and what goes with it) into ``out_dir``; return the tokens by id."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release open files."""
