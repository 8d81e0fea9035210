"""An encoder source → a CTranslate2 encoder directory, as CTranslate2's ``transformers`` converter writes BERT and
RoBERTa (``BertLoader``, ``RobertaLoader``, ``XLMRobertaLoader``, ``DistilBertLoader``), without torch.

Post-norm layers (``pre_norm=False``), fused QKV, word + token type embeddings added, learned positions (RoBERTa's
first ``padding_idx + 1`` rows dropped), a layer norm after the embeddings, no embedding scaling. The pooler and a
cross-encoder's classification head are not part of the CTranslate2 model: they are stored in ``head.npz`` (float32)
and applied in numpy after the encoder (engine/encoder.py), so one code path serves every head. ``encoder.json``
says what the model is (family, kind, pooling, lengths, labels).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

from ..errors import ConversionError
from .common import CONVERTER_VERSION, METADATA_FILE, check_quantization
from .encoder_source import EncoderConfig, EncoderSource

ENCODER_METADATA = "encoder.json"
HEAD_FILE = "head.npz"
HEAD_TENSORS = {
    "bert": ("pooler.dense.weight", "pooler.dense.bias", "classifier.weight", "classifier.bias"),
    "roberta": ("classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight", "classifier.out_proj.bias"),
    "distilbert": ("pre_classifier.weight", "pre_classifier.bias", "classifier.weight", "classifier.bias"),
}


def _activation(name: str):
    from ctranslate2.specs import common_spec

    return {"gelu": common_spec.Activation.GELU, "gelu_tanh": common_spec.Activation.GELUTanh,
            "relu": common_spec.Activation.RELU}[name]


def build_encoder_spec(source: EncoderSource, tokens: list[str], quantization: str):
    """The CTranslate2 spec of ``source``, quantized to ``quantization``, ready to save."""
    from ctranslate2.specs import common_spec, transformer_spec

    config = source.config
    w = source.tensor
    encoder_spec = transformer_spec.TransformerEncoderSpec(
        config.num_layers, config.num_heads, pre_norm=False, activation=_activation(config.activation),
        layernorm_embedding=True, num_source_embeddings=2 if config.token_types else 1,
        embeddings_merge=common_spec.EmbeddingsMerge.ADD,
    )
    spec = transformer_spec.TransformerEncoderModelSpec(encoder_spec)
    encoder = spec.encoder
    encoder.scale_embeddings = False
    encoder.embeddings[0].weight = w("embeddings.word_embeddings.weight")
    if config.token_types:
        encoder.embeddings[1].weight = w("embeddings.token_type_embeddings.weight")
    encoder.position_encodings.encodings = np.ascontiguousarray(w("embeddings.position_embeddings.weight")[config.position_offset:])
    encoder.layernorm_embedding.gamma = w("embeddings.LayerNorm.weight")
    encoder.layernorm_embedding.beta = w("embeddings.LayerNorm.bias")
    for i, layer in enumerate(encoder.layer):
        p = f"encoder.layer.{i}."
        attention = layer.self_attention
        attention.linear[0].weight = np.concatenate([w(f"{p}attention.self.{n}.weight") for n in ("query", "key", "value")])
        attention.linear[0].bias = np.concatenate([w(f"{p}attention.self.{n}.bias") for n in ("query", "key", "value")])
        attention.linear[1].weight = w(f"{p}attention.output.dense.weight")
        attention.linear[1].bias = w(f"{p}attention.output.dense.bias")
        attention.layer_norm.gamma = w(f"{p}attention.output.LayerNorm.weight")
        attention.layer_norm.beta = w(f"{p}attention.output.LayerNorm.bias")
        layer.ffn.linear_0.weight = w(f"{p}intermediate.dense.weight")
        layer.ffn.linear_0.bias = w(f"{p}intermediate.dense.bias")
        layer.ffn.linear_1.weight = w(f"{p}output.dense.weight")
        layer.ffn.linear_1.bias = w(f"{p}output.dense.bias")
        layer.ffn.layer_norm.gamma = w(f"{p}output.LayerNorm.weight")
        layer.ffn.layer_norm.beta = w(f"{p}output.LayerNorm.bias")
    tokens = list(tokens)
    if len(tokens) > config.vocab_size:
        raise ConversionError(f"{source.path}: the tokenizer has {len(tokens)} tokens but the embeddings only "
                              f"{config.vocab_size} rows")
    tokens += [f"<extra_id_{i}>" for i in range(config.vocab_size - len(tokens))]  # as BertLoader pads
    spec.register_vocabulary(tokens)
    unk = next((t for t in ("[UNK]", "<unk>") if t in tokens), tokens[0])
    spec.config.unk_token = unk
    spec.config.layer_norm_epsilon = config.layer_norm_eps
    spec.validate()
    spec.optimize(quantization=quantization)
    return spec


def _metadata(config: EncoderConfig) -> dict:
    return {
        "family": config.family, "kind": config.kind, "name": config.name, "hidden_size": config.hidden_size,
        "max_length": config.max_length, "max_positions": config.max_positions, "token_types": config.token_types,
        "pooling": config.pooling.mode, "normalize": config.pooling.normalize, "pooling_source": config.pooling.source,
        "head": config.head, "num_labels": config.num_labels, "labels": config.labels,
    }


def convert_encoder(source: EncoderSource, out_dir: str, quantization: str = "int8",
                    extra_metadata: dict | None = None) -> str:
    """Write ``source`` as a CTranslate2 encoder directory at ``out_dir`` (replaced whole, atomically)."""
    check_quantization(quantization)
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".tmp", dir=parent)
    try:
        model_dir = os.path.join(staging, "model")
        os.makedirs(model_dir)
        tokens = source.write_tokenizer_files(model_dir)
        config = source.config
        spec = build_encoder_spec(source, tokens, quantization)
        spec.save(model_dir)
        del spec
        if config.head:
            np.savez(os.path.join(model_dir, HEAD_FILE), **{n: source.tensor(n) for n in HEAD_TENSORS[config.head]})
        with open(os.path.join(model_dir, ENCODER_METADATA), "w", encoding="utf-8") as f:
            json.dump(_metadata(config), f, indent=2)
        with open(os.path.join(model_dir, METADATA_FILE), "w", encoding="utf-8") as f:

            json.dump({"converter_version": CONVERTER_VERSION, "source": os.path.basename(os.path.normpath(source.path)),
                       "source_format": source.format, "family": config.family, "architecture": config.family,
                       "model_name": config.name, "context_length": config.max_length, "quantization": quantization,
                       **(extra_metadata or {})}, f, indent=2)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(model_dir, out_dir)
    except MemoryError as exc:
        raise ConversionError(f"out of memory while converting {source.path}") from exc
    finally:
        source.close()
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
