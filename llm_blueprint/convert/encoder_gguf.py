"""GGUF files of llama.cpp's ``bert`` architecture: BERT embedding models as ``convert_hf_to_gguf.py`` writes them
(``BertModel``), read back into :mod:`.encoder_source`'s canonical view.

- Tensors: ``token_embd``, ``token_types``, ``position_embd``, ``token_embd_norm``, ``blk.N.attn_{q,k,v,output}``,
  ``attn_output_norm``, ``ffn_up``, ``ffn_down``, ``layer_output_norm`` (any type gguf can dequantize).
- Tokenizer: ``tokenizer.ggml.model = bert`` stores WordPiece tokens in "phantom space" form (a word-start token
  as ``▁word``, a continuation as the bare piece, control tokens as they are); it is turned back into a WordPiece
  ``tokenizer.json`` (``##`` continuations, BERT's lowercasing normalizer, ``[CLS] A [SEP] B [SEP]``), which is
  what llama.cpp's own WPM tokenizer does with it.
- Pooling: ``bert.pooling_type`` (mean, CLS, last); embeddings are normalised (as llama-server's ``/v1/embeddings``).

Cross-encoders in GGUF (``cls``/``cls.output``) and XLM-RoBERTa's ``t5`` tokenizer are not read.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..errors import ConversionError
from .encoder_source import EncoderConfig, EncoderSource, Pooling

ENCODER_ARCHITECTURES = {"bert": "embedding"}
POOLING_TYPES = {1: "mean", 2: "cls", 3: "last"}
CONTROL = 3
# gguf name -> canonical name (per layer, after "blk.{i}.")
LAYER_NAMES = {
    "attn_q": "attention.self.query", "attn_k": "attention.self.key", "attn_v": "attention.self.value",
    "attn_output": "attention.output.dense", "attn_output_norm": "attention.output.LayerNorm",
    "ffn_up": "intermediate.dense", "ffn_down": "output.dense", "layer_output_norm": "output.LayerNorm",
}
GLOBAL_NAMES = {
    "token_embd.weight": "embeddings.word_embeddings.weight", "token_types.weight": "embeddings.token_type_embeddings.weight",
    "position_embd.weight": "embeddings.position_embeddings.weight", "token_embd_norm.weight": "embeddings.LayerNorm.weight",
    "token_embd_norm.bias": "embeddings.LayerNorm.bias",
}


def gguf_architecture(path: str) -> str | None:
    """``general.architecture`` of a GGUF file, or None when it cannot be read."""
    try:
        import gguf

        field = gguf.GGUFReader(path).get_field("general.architecture")
        return None if field is None else str(field.contents())
    except Exception:  # not a readable GGUF: the chat loader reports it
        return None


def gguf_encoder_kind(path: str) -> str | None:
    """``embedding`` for a GGUF encoder, None for anything else."""
    return ENCODER_ARCHITECTURES.get(gguf_architecture(path) or "")


def _canonical_names(gguf_names: list[str]) -> dict[str, str]:
    names = {}
    for name in gguf_names:
        if name in GLOBAL_NAMES:
            names[GLOBAL_NAMES[name]] = name
        elif name.startswith("blk."):
            _, layer, rest = name.split(".", 2)
            base, _, suffix = rest.rpartition(".")
            if base in LAYER_NAMES:
                names[f"encoder.layer.{layer}.{LAYER_NAMES[base]}.{suffix}"] = name
    return names


class GGUFEncoder(EncoderSource):
    """A ``bert`` GGUF file."""

    format = "gguf"

    def __init__(self, path: str):
        from .gguf_file import open_gguf

        self.path = path
        self.file = open_gguf(path)
        if self.file.architecture != "bert":
            raise ConversionError(f"{path}: architecture {self.file.architecture!r} is not a GGUF encoder this "
                                  "converter reads (bert)")
        if self.file.has_tensor("cls.weight") or self.file.has_tensor("cls.output.weight"):
            raise ConversionError(f"{path}: GGUF cross-encoders (a classification head) are not supported; convert the "
                                  "Hugging Face folder")
        if self.file.field("tokenizer.ggml.model") != "bert":
            raise ConversionError(f"{path}: tokenizer {self.file.field('tokenizer.ggml.model')!r} is not supported "
                                  "(WordPiece, tokenizer.ggml.model = bert)")
        self._names = _canonical_names(self.file.tensor_names())
        f = self.file
        vocab_rows, hidden = self.file.tensor_shape("token_embd.weight")
        positions = self.file.tensor_shape("position_embd.weight")[0]
        self.config = EncoderConfig(
            family="bert", num_layers=int(f.arch_field("block_count")), hidden_size=int(f.arch_field("embedding_length")),
            num_heads=int(f.arch_field("attention.head_count")), intermediate_size=int(f.arch_field("feed_forward_length")),
            vocab_size=vocab_rows, max_positions=positions,
            layer_norm_eps=float(f.arch_field("attention.layer_norm_epsilon", 1e-12)), activation="gelu",
            token_types=self.file.tensor_shape("token_types.weight")[0] if f.has_tensor("token_types.weight") else 0,
            max_length=min(positions, int(f.arch_field("context_length", positions))),
            pooling=Pooling(POOLING_TYPES.get(int(f.arch_field("pooling_type", 1)), "mean"), True, "bert.pooling_type"),
            name=str(f.field("general.name") or os.path.basename(path)),
        )
        if hidden != self.config.hidden_size:
            raise ConversionError(f"{path}: token_embd is {hidden} wide but the embedding length is {self.config.hidden_size}")

    def has_tensor(self, name: str) -> bool:
        return name in self._names

    def tensor(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise ConversionError(f"{self.path}: tensor {name!r} is missing")
        return self.file.tensor(self._names[name])

    def write_tokenizer_files(self, out_dir: str) -> list[str]:
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

        f = self.file
        stored = f.string_array("tokenizer.ggml.tokens")
        types = f.number_array("tokenizer.ggml.token_type")
        tokens = []
        for i, token in enumerate(stored):
            if types is not None and int(types[i]) == CONTROL:
                tokens.append(token)
            elif token.startswith("\u2581"):
                tokens.append(token[1:])
            else:
                tokens.append("##" + token)
        vocab: dict[str, int] = {}
        for i, token in enumerate(tokens):
            vocab.setdefault(token, i)

        def special(key: str, fallback: str) -> str:
            value = f.field(f"tokenizer.ggml.{key}_token_id")
            return tokens[int(value)] if value is not None and int(value) < len(tokens) else fallback

        cls, sep, unk = special("cls", special("bos", "[CLS]")), special("seperator", "[SEP]"), special("unknown", "[UNK]")
        tokenizer = Tokenizer(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        if cls in vocab and sep in vocab:
            tokenizer.post_processor = processors.TemplateProcessing(
                single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1", special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
        specials = [t for i, t in enumerate(tokens) if types is not None and int(types[i]) == CONTROL]
        from tokenizers import AddedToken

        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials if vocab.get(t) is not None])
        tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as out:
            json.dump({"cls_token": cls, "sep_token": sep, "unk_token": unk, "do_lower_case": True}, out, indent=2)
        return tokens

    def close(self) -> None:
        self.file = None
