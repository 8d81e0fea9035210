"""A Hugging Face encoder folder (BERT, RoBERTa, XLM-RoBERTa, DistilBERT): ``config.json``, safetensors,
``tokenizer.json``, and a sentence-transformers model's ``modules.json`` / ``1_Pooling/config.json``.

Embedding models (``BertModel`` as sentence-transformers saves it) and cross-encoders
(``*ForSequenceClassification``: a classification head after the encoder) are both read; tensor names are
mapped to :mod:`.encoder_source`'s canonical BERT names.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil

import numpy as np

from ..errors import ConversionError
from .encoder_source import ENCODER_FAMILIES, EncoderConfig, EncoderSource, Pooling
from .hf_folder import FLOAT_DTYPES, SafetensorsFile, _read_json, is_integer_buffer
from .hf_tokenizer import _tokens_from_tokenizer_json

MODEL_TYPES = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "xlm-roberta", "camembert": "roberta",
               "distilbert": "distilbert"}
ACTIVATIONS = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
BASE_PREFIXES = ("bert.", "roberta.", "distilbert.", "xlm_roberta.", "camembert.", "model.")
# DistilBERT's names -> canonical (BERT) names; {i} is the layer.
DISTILBERT_NAMES = (
    (r"^transformer\.layer\.(\d+)\.attention\.q_lin\.", r"encoder.layer.\1.attention.self.query."),
    (r"^transformer\.layer\.(\d+)\.attention\.k_lin\.", r"encoder.layer.\1.attention.self.key."),
    (r"^transformer\.layer\.(\d+)\.attention\.v_lin\.", r"encoder.layer.\1.attention.self.value."),
    (r"^transformer\.layer\.(\d+)\.attention\.out_lin\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^transformer\.layer\.(\d+)\.sa_layer_norm\.", r"encoder.layer.\1.attention.output.LayerNorm."),
    (r"^transformer\.layer\.(\d+)\.ffn\.lin1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^transformer\.layer\.(\d+)\.ffn\.lin2\.", r"encoder.layer.\1.output.dense."),
    (r"^transformer\.layer\.(\d+)\.output_layer_norm\.", r"encoder.layer.\1.output.LayerNorm."),
)
ST_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max",
                   "pooling_mode_lasttoken": "last", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def is_encoder_folder(path: str) -> bool:
    """A Hugging Face folder whose ``config.json`` names an encoder family this converter reads."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return json.load(f).get("model_type") in MODEL_TYPES
    except (OSError, ValueError, AttributeError):
        return False


def _canonical(name: str, family: str) -> str:
    for prefix in BASE_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if family == "distilbert":
        for pattern, replacement in DISTILBERT_NAMES:
            name = re.sub(pattern, replacement, name)
    # Old checkpoints name LayerNorm parameters gamma/beta.
    return re.sub(r"(LayerNorm|layer_norm)\.gamma$", r"\1.weight", re.sub(r"(LayerNorm|layer_norm)\.beta$", r"\1.bias", name))


def read_pooling(path: str, has_modules: bool) -> Pooling:
    """The sentence-transformers pooling and normalisation of the folder; mean pooling and unit vectors when the folder
    has no sentence-transformers files (what ``SentenceTransformer`` builds around a plain model, plus the unit length
    OpenAI's embeddings have)."""
    if not has_modules:
        return Pooling()
    modules = [m for m in _read_json(os.path.join(path, "modules.json"), list) if isinstance(m, dict)]
    pooling, normalize, source = None, False, "modules.json"
    for module in modules:
        kind = str(module.get("type", ""))
        if kind.endswith("models.Pooling"):
            config = _read_json(os.path.join(path, module.get("path") or "", "config.json"))
            if config.get("pooling_mode"):  # newer files name the mode directly
                pooling = {"lasttoken": "last", "mean_tokens": "mean"}.get(config["pooling_mode"], config["pooling_mode"])
            else:
                modes = [mode for key, mode in ST_POOLING_KEYS.items() if config.get(key)]
                if len(modes) != 1:
                    raise ConversionError(f"{path}: pooling {modes or 'none'} is not supported (exactly one mode needed)")
                pooling = modes[0]
            source = f"{module.get('path')}/config.json"
        elif kind.endswith("models.Normalize"):
            normalize = True
        elif not kind.endswith("models.Transformer"):
            raise ConversionError(f"{path}: sentence-transformers module {kind!r} is not supported "
                                  "(only Transformer, Pooling and Normalize)")
    if pooling is None:
        raise ConversionError(f"{path}: modules.json has no Pooling module")
    return Pooling(pooling, normalize, source)


class HFEncoderFolder(EncoderSource):
    """A Hugging Face folder of a BERT-family encoder."""

    format = "huggingface"

    def __init__(self, path: str):
        self.path = path
        hf = _read_json(os.path.join(path, "config.json"))
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConversionError(f"{path}: model_type {model_type!r} is not an encoder family this converter reads "
                                  f"({', '.join(sorted(MODEL_TYPES))})")
        self.hf_config = hf
        self.family = MODEL_TYPES[model_type]
        self._tensors: dict[str, tuple[SafetensorsFile, str]] = {}
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            bins = glob.glob(os.path.join(path, "*.bin"))
            hint = " (PyTorch .bin checkpoints need torch; save the model as safetensors)" if bins else ""
            raise ConversionError(f"{path}: no .safetensors weights found{hint}")
        for file_path in files:
            shard = SafetensorsFile(file_path)
            for name, entry in shard.entries.items():
                if is_integer_buffer(name, entry["dtype"]):
                    continue
                if entry["dtype"] not in FLOAT_DTYPES:
                    raise ConversionError(f"{file_path}: tensor {name!r} has dtype {entry['dtype']}; "
                                          f"readable: {', '.join(FLOAT_DTYPES)}")
                self._tensors[_canonical(name, self.family)] = (shard, name)
        self.config = self._read_config()

    def _read_config(self) -> EncoderConfig:
        hf, family = self.hf_config, self.family
        distil = family == "distilbert"
        try:
            num_layers = int(hf["n_layers" if distil else "num_hidden_layers"])
            hidden = int(hf["dim" if distil else "hidden_size"])
            num_heads = int(hf["n_heads" if distil else "num_attention_heads"])
            intermediate = int(hf["hidden_dim" if distil else "intermediate_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConversionError(f"{self.path}: config.json lacks {exc}") from None
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ConversionError(f"{self.path}: position_embedding_type {hf['position_embedding_type']!r} is not "
                                  "supported (CTranslate2 encoders have absolute positions only)")
        act_name = hf.get("activation" if distil else "hidden_act", "gelu")
        activation = ACTIVATIONS.get(act_name)
        if activation is None:
            raise ConversionError(f"{self.path}: activation {act_name!r} is not supported")
        vocab_rows, width = self.shape("embeddings.word_embeddings.weight")
        if width != hidden:
            raise ConversionError(f"{self.path}: word_embeddings are {width} wide but the hidden size is {hidden}")
        position_rows = self.shape("embeddings.position_embeddings.weight")[0]
        offset = int(hf.get("pad_token_id", 1)) + 1 if family in ("roberta", "xlm-roberta") else 0
        head, num_labels = self._head()
        labels = hf.get("id2label") or {}
        max_positions = position_rows - offset
        has_modules = os.path.isfile(os.path.join(self.path, "modules.json"))
        max_length = max_positions
        st_config = _read_json(os.path.join(self.path, "sentence_bert_config.json")) if has_modules else {}
        if st_config.get("max_seq_length"):
            max_length = min(max_length, int(st_config["max_seq_length"]))
        return EncoderConfig(
            family=family, num_layers=num_layers, hidden_size=hidden, num_heads=num_heads,
            intermediate_size=intermediate, vocab_size=vocab_rows, max_positions=max_positions,
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)), activation=activation, position_offset=offset,
            token_types=self.shape("embeddings.token_type_embeddings.weight")[0]
            if self.has_tensor("embeddings.token_type_embeddings.weight") else 0,
            has_pooler=self.has_tensor("pooler.dense.weight"), head=head, num_labels=num_labels,
            labels=[str(labels.get(str(i), labels.get(i, f"LABEL_{i}"))) for i in range(num_labels)],
            max_length=max_length, pooling=read_pooling(self.path, has_modules) if head is None else Pooling("cls", False, "classification head"),
            name=hf.get("_name_or_path") or os.path.basename(os.path.normpath(self.path)),
        )

    def _head(self) -> tuple[str | None, int]:
        """The classification head after the encoder, if any, and its number of labels."""
        if self.has_tensor("classifier.out_proj.weight"):
            head = "roberta"
            rows = self.shape("classifier.out_proj.weight")[0]
        elif self.has_tensor("pre_classifier.weight"):
            head = "distilbert"
            rows = self.shape("classifier.weight")[0]
        elif self.has_tensor("classifier.weight"):
            head = "bert"
            rows = self.shape("classifier.weight")[0]
            if not self.has_tensor("pooler.dense.weight"):
                raise ConversionError(f"{self.path}: a BERT classifier without the pooler it reads is not supported")
        else:
            return None, 0
        return head, rows

    def has_tensor(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._tensors:
            raise ConversionError(f"{self.path}: tensor {name!r} is missing")
        shard, stored = self._tensors[name]
        return shard.shape(stored)

    def tensor(self, name: str) -> np.ndarray:
        if name not in self._tensors:
            raise ConversionError(f"{self.path}: tensor {name!r} is missing")
        shard, stored = self._tensors[name]
        array = shard.read(stored)
        return array if array.flags.writeable else array.copy()

    def write_tokenizer_files(self, out_dir: str) -> list[str]:
        source = os.path.join(self.path, "tokenizer.json")
        target = os.path.join(out_dir, "tokenizer.json")
        if os.path.isfile(source):
            shutil.copyfile(source, target)
        elif os.path.isfile(os.path.join(self.path, "vocab.txt")) and self.family in ("bert", "distilbert"):
            self._wordpiece_from_vocab(target)
        else:
            raise ConversionError(f"{self.path}: no tokenizer.json (a fast tokenizer is needed; save it with "
                                  "tokenizer.save_pretrained from a fast tokenizer)")
        for name in ("tokenizer_config.json", "special_tokens_map.json", *ST_FILES):
            if os.path.isfile(os.path.join(self.path, name)):
                shutil.copyfile(os.path.join(self.path, name), os.path.join(out_dir, name))
        return _tokens_of(target)

    def _wordpiece_from_vocab(self, target: str) -> None:
        """A BERT folder with only ``vocab.txt``: the same WordPiece tokenizer, as ``tokenizer.json``."""
        from tokenizers.implementations import BertWordPieceTokenizer

        config = _read_json(os.path.join(self.path, "tokenizer_config.json")) if os.path.isfile(
            os.path.join(self.path, "tokenizer_config.json")) else {}
        tokenizer = BertWordPieceTokenizer(os.path.join(self.path, "vocab.txt"),
                                           lowercase=bool(config.get("do_lower_case", True)))
        tokenizer.save(target)


def _tokens_of(tokenizer_json: str) -> list[str]:
    """Token strings by id (gaps filled with placeholders), as many as the tokenizer knows."""
    return [tok if tok is not None else f"<unused_{i}>" for i, tok in enumerate(_tokens_from_tokenizer_json(tokenizer_json))]


def open_encoder_folder(path: str) -> HFEncoderFolder:
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: not a folder")
    return HFEncoderFolder(path)


__all__ = ["ENCODER_FAMILIES", "HFEncoderFolder", "is_encoder_folder", "open_encoder_folder", "read_pooling"]
