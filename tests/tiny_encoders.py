"""Tiny random-weight encoders (BERT, XLM-RoBERTa, DistilBERT), written the way transformers and
sentence-transformers save them, and an independent numpy forward pass to check conversions against.

- ``config.json`` as transformers writes it for the family;
- ``model.safetensors`` under the names transformers uses (``bert.``/``roberta.``/``distilbert.`` prefixes for the
  ``*ForSequenceClassification`` models, none for the bare models sentence-transformers saves);
- ``tokenizer.json`` trained here with ``tokenizers``: WordPiece with BERT's normalizer and ``[CLS] A [SEP] B [SEP]``
  template (type ids 0/1), or a Unigram model with RoBERTa's ``<s> A </s></s> B </s>``;
- sentence-transformers' ``modules.json``, ``1_Pooling/config.json`` (and ``2_Normalize``) for embedding models.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from functools import cache

import numpy as np
from tiny_models import CORPUS

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


@cache
def wordpiece_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=220, special_tokens=BERT_SPECIALS,
                                                              show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    tok.decoder = decoders.WordPiece()
    return tok.to_str()


@cache
def unigram_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=200, special_tokens=ROBERTA_SPECIALS,
                                                            unk_token="<unk>", show_progress=False))
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")))
    tok.decoder = decoders.Metaspace()
    return tok.to_str()


@dataclass
class TinyEncoder:
    name: str
    model_type: str  # bert, xlm-roberta, distilbert
    head: str | None = None  # None (embedding model), or the *ForSequenceClassification head
    pooling: str = "mean"
    normalize: bool = True
    sentence_transformers: bool = True
    num_labels: int = 1
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    ffn: int = 128
    positions: int = 128
    extra_vocab: int = 3
    activation: str = "gelu"
    config_extra: dict = field(default_factory=dict)
    tokenizer_text: str | None = None  # a tokenizer.json of its own (else one trained here)

    @property
    def roberta(self) -> bool:
        return self.model_type in ("roberta", "xlm-roberta")

    @property
    def tokenizer_json(self) -> str:
        if self.tokenizer_text:
            return self.tokenizer_text
        return unigram_tokenizer_json() if self.roberta else wordpiece_tokenizer_json()

    @property
    def vocab_size(self) -> int:
        return json.loads(self.tokenizer_json)["model"]["vocab"].__len__() + self.extra_vocab

    @property
    def offset(self) -> int:
        return 2 if self.roberta else 0  # RoBERTa: padding_idx (1) + 1


TINY_ENCODERS = {t.name: t for t in [
    TinyEncoder("bert-embed", "bert", pooling="cls", normalize=True),
    TinyEncoder("bert-embed-mean", "bert", pooling="mean", normalize=False, sentence_transformers=True),
    TinyEncoder("xlmr-embed", "xlm-roberta", pooling="mean", normalize=True),
    TinyEncoder("bert-rerank", "bert", head="bert", sentence_transformers=False),
    TinyEncoder("xlmr-rerank", "xlm-roberta", head="roberta", sentence_transformers=False),
    TinyEncoder("distilbert-rerank", "distilbert", head="distilbert", sentence_transformers=False, num_labels=2),
]}


def config_json(t: TinyEncoder) -> dict:
    if t.model_type == "distilbert":
        config = {"model_type": "distilbert", "dim": t.hidden, "n_layers": t.layers, "n_heads": t.heads,
                  "hidden_dim": t.ffn, "max_position_embeddings": t.positions, "activation": t.activation,
                  "vocab_size": t.vocab_size, "pad_token_id": 0}
    else:
        config = {"model_type": t.model_type, "hidden_size": t.hidden, "num_hidden_layers": t.layers,
                  "num_attention_heads": t.heads, "intermediate_size": t.ffn, "hidden_act": t.activation,
                  "max_position_embeddings": t.positions + t.offset, "type_vocab_size": 1 if t.roberta else 2,
                  "layer_norm_eps": 1e-5 if t.roberta else 1e-12, "vocab_size": t.vocab_size,
                  "pad_token_id": 1 if t.roberta else 0, "position_embedding_type": "absolute"}
    arch = {"bert": "Bert", "xlm-roberta": "XLMRoberta", "distilbert": "DistilBert"}[t.model_type]
    config["architectures"] = [f"{arch}ForSequenceClassification" if t.head else f"{arch}Model"]
    if t.head:
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(t.num_labels)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(t.num_labels)}
    config.update(t.config_extra)
    return config


def random_weights(t: TinyEncoder, seed: int = 0) -> dict[str, np.ndarray]:
    """Canonical (BertModel) names, plus the head's own names."""
    rng = np.random.default_rng(seed)
    H, F = t.hidden, t.ffn

    def linear(name: str, out: int, inp: int) -> dict[str, np.ndarray]:
        return {f"{name}.weight": (rng.standard_normal((out, inp)) / math.sqrt(inp)).astype(np.float32),
                f"{name}.bias": (0.1 * rng.standard_normal(out)).astype(np.float32)}

    def norm(name: str) -> dict[str, np.ndarray]:
        return {f"{name}.weight": (1 + 0.1 * rng.standard_normal(H)).astype(np.float32),
                f"{name}.bias": (0.1 * rng.standard_normal(H)).astype(np.float32)}

    w = {"embeddings.word_embeddings.weight": rng.standard_normal((t.vocab_size, H)).astype(np.float32),
         "embeddings.position_embeddings.weight": rng.standard_normal((t.positions + t.offset, H)).astype(np.float32),
         **norm("embeddings.LayerNorm")}
    if t.model_type != "distilbert":
        w["embeddings.token_type_embeddings.weight"] = rng.standard_normal((1 if t.roberta else 2, H)).astype(np.float32)
    for i in range(t.layers):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            w.update(linear(f"{p}attention.self.{n}", H, H))
        w.update(linear(f"{p}attention.output.dense", H, H))
        w.update(norm(f"{p}attention.output.LayerNorm"))
        w.update(linear(f"{p}intermediate.dense", F, H))
        w.update(linear(f"{p}output.dense", H, F))
        w.update(norm(f"{p}output.LayerNorm"))
    if t.model_type == "bert":
        w.update(linear("pooler.dense", H, H))
    if t.head == "bert":
        w.update(linear("classifier", t.num_labels, H))
    elif t.head == "roberta":
        w.update(linear("classifier.dense", H, H))
        w.update(linear("classifier.out_proj", t.num_labels, H))
    elif t.head == "distilbert":
        w.update(linear("pre_classifier", H, H))
        w.update(linear("classifier", t.num_labels, H))
    return w


DISTILBERT_STORED = (
    ("encoder.layer.", "transformer.layer."), ("attention.self.query.", "attention.q_lin."),
    ("attention.self.key.", "attention.k_lin."), ("attention.self.value.", "attention.v_lin."),
    ("attention.output.dense.", "attention.out_lin."), ("attention.output.LayerNorm.", "sa_layer_norm."),
    ("intermediate.dense.", "ffn.lin1."), ("output.dense.", "ffn.lin2."), ("output.LayerNorm.", "output_layer_norm."),
)


def stored_name(t: TinyEncoder, name: str) -> str:
    """The name transformers saves a canonical tensor under."""
    if name.startswith(("classifier", "pre_classifier")):
        return name
    if t.model_type == "distilbert":
        for a, b in DISTILBERT_STORED:
            name = name.replace(a, b)
    if t.head:
        name = {"bert": "bert.", "xlm-roberta": "roberta.", "distilbert": "distilbert."}[t.model_type] + name
    if not t.head and t.model_type == "bert" and t.name.endswith("mean"):
        name = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")  # old names
    return name


def write_folder(t: TinyEncoder, folder: str, weights: dict[str, np.ndarray]) -> str:
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config_json(t), f, indent=2)
    save_file({stored_name(t, n): np.ascontiguousarray(v) for n, v in weights.items()},
              os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(t.tokenizer_json)
    if t.sentence_transformers and not t.head:
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if t.normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
            os.makedirs(os.path.join(folder, "2_Normalize"), exist_ok=True)
        with open(os.path.join(folder, "modules.json"), "w") as f:
            json.dump(modules, f)
        os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
        with open(os.path.join(folder, "1_Pooling", "config.json"), "w") as f:
            json.dump({"word_embedding_dimension": t.hidden, "pooling_mode_cls_token": t.pooling == "cls",
                       "pooling_mode_mean_tokens": t.pooling == "mean", "pooling_mode_max_tokens": False,
                       "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_lasttoken": t.pooling == "last"}, f)
        with open(os.path.join(folder, "sentence_bert_config.json"), "w") as f:
            json.dump({"max_seq_length": t.positions, "do_lower_case": False}, f)
    return folder


def build(t: TinyEncoder, folder: str, seed: int = 0) -> dict[str, np.ndarray]:
    weights = random_weights(t, seed)
    write_folder(t, folder, weights)
    return weights


# The reference forward pass --------------------------------------------------------------
def _layer_norm(x: np.ndarray, w: dict, name: str, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w[f"{name}.weight"] + w[f"{name}.bias"]


def _linear(x: np.ndarray, w: dict, name: str) -> np.ndarray:
    return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]


_erf = np.vectorize(math.erf)


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def reference_states(t: TinyEncoder, w: dict, ids: list[int], type_ids: list[int] | None = None) -> np.ndarray:
    """Last hidden states ``[len(ids), hidden]`` of one unpadded input, in float64."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    eps = config_json(t).get("layer_norm_eps", 1e-12)
    n = len(ids)
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][t.offset: t.offset + n]
    if "embeddings.token_type_embeddings.weight" in w:
        x = x + w["embeddings.token_type_embeddings.weight"][type_ids or [0] * n]
    x = _layer_norm(x, w, "embeddings.LayerNorm", eps)
    d = t.hidden // t.heads
    for i in range(t.layers):
        p = f"encoder.layer.{i}."
        q, k, v = (_linear(x, w, f"{p}attention.self.{m}").reshape(n, t.heads, d).transpose(1, 0, 2)
                   for m in ("query", "key", "value"))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attention = (scores / scores.sum(-1, keepdims=True)) @ v
        x = _layer_norm(x + _linear(attention.transpose(1, 0, 2).reshape(n, t.hidden), w, f"{p}attention.output.dense"),
                        w, f"{p}attention.output.LayerNorm", eps)
        x = _layer_norm(x + _linear(_gelu(_linear(x, w, f"{p}intermediate.dense")), w, f"{p}output.dense"),
                        w, f"{p}output.LayerNorm", eps)
    return x


def reference_embedding(t: TinyEncoder, w: dict, ids: list[int]) -> np.ndarray:
    states = reference_states(t, w, ids)
    vector = {"cls": states[0], "last": states[-1], "mean": states.mean(0)}[t.pooling]
    return vector / np.linalg.norm(vector) if t.normalize else vector


def reference_logits(t: TinyEncoder, w: dict, ids: list[int], type_ids: list[int]) -> np.ndarray:
    first = reference_states(t, w, ids, type_ids)[0]
    w = {k: v.astype(np.float64) for k, v in w.items()}
    if t.head == "bert":
        return _linear(np.tanh(_linear(first, w, "pooler.dense")), w, "classifier")
    if t.head == "roberta":
        return _linear(np.tanh(_linear(first, w, "classifier.dense")), w, "classifier.out_proj")
    return _linear(np.maximum(_linear(first, w, "pre_classifier"), 0), w, "classifier")


# GGUF, as llama.cpp's convert_hf_to_gguf.py writes a BERT embedding model (BertModel) --------------------------
GGUF_NAMES = (
    ("embeddings.word_embeddings.weight", "token_embd.weight"), ("embeddings.token_type_embeddings.weight", "token_types.weight"),
    ("embeddings.position_embeddings.weight", "position_embd.weight"), ("embeddings.LayerNorm.", "token_embd_norm."),
    ("attention.self.query.", "attn_q."), ("attention.self.key.", "attn_k."), ("attention.self.value.", "attn_v."),
    ("attention.output.dense.", "attn_output."), ("attention.output.LayerNorm.", "attn_output_norm."),
    ("intermediate.dense.", "ffn_up."), ("output.dense.", "ffn_down."), ("output.LayerNorm.", "layer_output_norm."),
    ("encoder.layer.", "blk."),
)


def gguf_name(name: str) -> str:
    for a, b in GGUF_NAMES:
        name = name.replace(a, b)
    return name


def write_bert_gguf(t: TinyEncoder, weights: dict[str, np.ndarray], path: str, ftype: str = "F32") -> str:
    """A BERT (WordPiece) embedding model as llama.cpp's converter writes it: the ``bert`` architecture, tensors under
    gguf's BERT names (no pooler), the vocabulary in "phantom space" form (``##x`` -> ``x``, other words -> ``▁x``,
    control tokens as they are), special ids, pooling type. ``ftype``: F32, F16 or Q8_0 (2-D weights; norms stay F32)."""
    import gguf

    tokenizer = json.loads(t.tokenizer_json)
    vocab = tokenizer["model"]["vocab"]
    tokens = [None] * len(vocab)
    for tok, i in vocab.items():
        tokens[i] = tok
    specials = {a["content"] for a in tokenizer.get("added_tokens") or [] if a.get("special")} | set(BERT_SPECIALS)
    types = [gguf.TokenType.CONTROL if tok in specials else gguf.TokenType.NORMAL for tok in tokens]
    phantom = [tok if tok in specials else (tok[2:] if tok.startswith("##") else "\u2581" + tok) for tok in tokens]
    config = config_json(t)
    writer = gguf.GGUFWriter(path, "bert")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(t.hidden)
    writer.add_feed_forward_length(t.ffn)
    writer.add_block_count(t.layers)
    writer.add_head_count(t.heads)
    writer.add_layer_norm_eps(config["layer_norm_eps"])
    writer.add_causal_attention(False)
    writer.add_pooling_type({"mean": gguf.PoolingType.MEAN, "cls": gguf.PoolingType.CLS, "last": gguf.PoolingType.LAST}[t.pooling])
    writer.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                          "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[ftype])
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(phantom)
    writer.add_token_types(types)
    writer.add_token_type_count(config["type_vocab_size"])
    for key, token in (("bos", "[CLS]"), ("sep", "[SEP]"), ("unk", "[UNK]"), ("pad", "[PAD]"), ("mask", "[MASK]")):
        if token in vocab:
            getattr(writer, f"add_{key}_token_id")(vocab[token])
    writer.add_add_bos_token(True)
    writer.add_add_sep_token(True)
    for name, tensor in weights.items():
        if name.startswith(("pooler.", "classifier", "pre_classifier")):
            continue  # llama.cpp's converter drops the pooler of an embedding model
        data = np.ascontiguousarray(tensor, dtype=np.float32)
        if name.startswith(("embeddings.position_", "embeddings.token_type_")):  # added as they are: llama.cpp keeps F32
            writer.add_tensor(gguf_name(name), data)
        elif data.ndim == 2 and ftype == "F16":
            writer.add_tensor(gguf_name(name), data.astype(np.float16))
        elif data.ndim == 2 and ftype == "Q8_0" and data.shape[1] % 32 == 0:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
