"""Tiny random-weight models of every supported family, written the way their own tools write them.

- A Hugging Face folder: ``config.json``, safetensors (float32, float16 or
  bfloat16; one file, or shards with an index), a tokenizer trained here (a
  byte-level BPE ``tokenizer.json`` with ``tokenizers``, or a SentencePiece
  ``tokenizer.model`` with ``sentencepiece``), the chat template,
  ``generation_config.json``.
- A GGUF file laid out as llama.cpp's ``convert_hf_to_gguf.py`` writes that
  family: tensor names from gguf's own ``TensorNameMap``, Q/K rows permuted for
  ``llama``, Gemma's ``+1`` folded into its norms, ``rope_freqs`` for Llama 3
  scaling, ``rope_factors_*`` for Phi-3, the metadata keys each model class
  sets, the tokenizer arrays of ``_set_vocab_gpt2``/``_set_vocab_sentencepiece``
  and ``gguf.SpecialVocab`` (llama.cpp's own code) for special ids, merges and
  the chat template.

Weights are random but exactly representable in bfloat16 and float16, so every
storage type holds the same numbers and the reference needs no rounding.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
from dataclasses import dataclass
from functools import cache

import gguf
import numpy as np

CORPUS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "What is the capital of France? The capital of France is Paris.",
    "Numbers like 12345 and 3.14159 appear in text, as do dates such as 2024-05-17.",
    "She said: \"Hello, world!\" and he answered, 'Good morning to you.'",
    "def add(a, b):\n    return a + b  # a tiny function\n",
    "Models read tokens; tokenizers split words into pieces and bytes.",
    "It's a small world; we're all connected, aren't we? They'll see.",
    "Le café est très bon à Paris. Über alles, naïve façade, jalapeño.",
    "The assistant answers questions briefly and politely, then stops.",
] * 4

# Split rules of the real tokenizer.json files (Llama 3, Qwen2).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n{{ message['content'] | trim }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

PHI2_TEMPLATE = (  # Phi-2 ships none; its model card's question-answer format
    "{% for message in messages %}{% if message['role'] == 'user' %}Instruct: {{ message['content'] }}\nOutput:"
    "{% elif message['role'] == 'assistant' %} {{ message['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
)
GEMMA4_TEMPLATE = GEMMA_TEMPLATE.replace("<start_of_turn>", "<|turn>").replace("<end_of_turn>", "<turn|>")


# Tokenizers ------------------------------------------------------------------
@dataclass(frozen=True)
class TokenizerKind:
    kind: str  # "bpe" (byte-level), "spbpe" (tokenizer.json BPE over ▁-text with byte fallback, Gemma 4) or "sp"
    split: str = ""
    specials: tuple[str, ...] = ()
    bos_post_processor: str | None = None
    control: tuple[str, ...] = ()
    user_defined: tuple[str, ...] = ()
    pieces: tuple[tuple[str, int], ...] = (("unk", 0), ("bos", 1), ("eos", 2), ("pad", -1))
    piece_names: tuple[tuple[str, str], ...] = ()
    add_dummy_prefix: bool = True


TOKENIZERS = {
    "llama3": TokenizerKind("bpe", LLAMA3_SPLIT, ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                                  "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"),
                            bos_post_processor="<|begin_of_text|>"),
    "gpt2": TokenizerKind("bpe", GPT2_SPLIT, ("<|endoftext|>",)),
    "qwen": TokenizerKind("bpe", QWEN2_SPLIT, ("<|endoftext|>", "<|im_start|>", "<|im_end|>")),
    "llama_sp": TokenizerKind("sp", control=("[INST]", "[/INST]")),
    "gemma_sp": TokenizerKind("sp", user_defined=("<start_of_turn>", "<end_of_turn>"),
                              pieces=(("pad", 0), ("eos", 1), ("bos", 2), ("unk", 3)),
                              piece_names=(("bos_piece", "<bos>"), ("eos_piece", "<eos>")), add_dummy_prefix=False),
    "gemma4": TokenizerKind("spbpe", specials=("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>"),
                            bos_post_processor="<bos>"),
}


def _spbpe_tokenizer_json(spec: TokenizerKind) -> str:
    """Gemma 4's kind of tokenizer.json: spaces become ▁, BPE merges over the whole text, byte fallback pieces
    <0x00>..<0xFF> right after the special tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=160, special_tokens=list(spec.specials),
                                                        show_progress=False))
    data = json.loads(tok.to_str())
    vocab = {t: i for i, t in enumerate(spec.specials)}
    vocab.update({f"<0x{b:02X}>": len(spec.specials) + b for b in range(256)})
    for token, _ in sorted(data["model"]["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1))
                                                    for m in data["model"]["merges"]],
                               unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in spec.specials])
    bos = spec.bos_post_processor
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, vocab[bos])])
    return tok.to_str()


@cache
def bpe_tokenizer_json(name: str) -> str:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    spec = TOKENIZERS[name]
    if spec.kind == "spbpe":
        return _spbpe_tokenizer_json(spec)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(spec.split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in spec.specials])
    if spec.bos_post_processor:
        bos = spec.bos_post_processor
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok.to_str()


@cache
def sentencepiece_model(name: str) -> bytes:
    import sentencepiece as spm

    spec = TOKENIZERS[name]
    out = io.BytesIO()
    ids = {f"{k}_id": v for k, v in spec.pieces}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=out, vocab_size=330, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=spec.add_dummy_prefix, split_digits=True, control_symbols=list(spec.control),
        user_defined_symbols=list(spec.user_defined), minloglevel=2, hard_vocab_limit=False,
        **ids, **dict(spec.piece_names),
    )
    return out.getvalue()


# Families ----------------------------------------------------------------------
@dataclass
class Tiny:
    """One tiny model: its config.json, tokenizer, chat template and how its files are stored."""

    name: str
    config: dict
    tokenizer: str
    template: str
    template_in: str  # tokenizer_config, jinja or json
    terminator: str
    special_tokens: dict  # tokenizer_config.json's bos_token/eos_token/... as texts (None: absent)
    generation_eos: tuple[str, ...]
    added_tokens: tuple[str, ...] = ()  # SentencePiece: tokens added on top (Phi-3's <|end|> ...)
    hf_dtype: str = "float32"
    shards: int = 1
    gguf_ftype: str = "F16"
    sources: tuple[str, ...] = ("hf", "gguf")
    extra_vocab: int = 7  # embedding rows past the tokenizer (as real models pad their vocabulary)

    @property
    def model_type(self) -> str:
        return self.config["model_type"]


def _base(model_type: str, arch: str, **extra) -> dict:
    config = {
        "architectures": [arch], "model_type": model_type, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 4096, "hidden_act": "silu", "tie_word_embeddings": False,
    }
    config.update(extra)
    return config


FAMILIES = {
    t.name: t for t in [
        Tiny("llama3", _base("llama", "LlamaForCausalLM", head_dim=16, tie_word_embeddings=True, max_position_embeddings=131072,
                             rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
             "llama3", LLAMA3_TEMPLATE, "tokenizer_config", "<|eot_id|>",
             {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
             ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"), hf_dtype="bfloat16", shards=2, gguf_ftype="Q8_0"),
        Tiny("llama2_linear", _base("llama", "LlamaForCausalLM", rope_scaling={"type": "linear", "factor": 4.0}),
             "llama_sp", MISTRAL_TEMPLATE, "tokenizer_config", "</s>",
             {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, ("</s>",), hf_dtype="float16"),
        Tiny("mistral", _base("mistral", "MistralForCausalLM", rope_theta=1_000_000.0, sliding_window=4096),
             "llama_sp", MISTRAL_TEMPLATE, "jinja", "</s>",
             {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, ("</s>",), hf_dtype="bfloat16"),
        Tiny("qwen2", _base("qwen2", "Qwen2ForCausalLM", rope_theta=1_000_000.0, tie_word_embeddings=True,
                            max_position_embeddings=32768, rms_norm_eps=1e-6),
             "qwen", CHATML_TEMPLATE, "jinja", "<|im_end|>",
             {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
             ("<|im_end|>", "<|endoftext|>"), hf_dtype="float32"),
        Tiny("qwen3", _base("qwen3", "Qwen3ForCausalLM", head_dim=32, rope_theta=1_000_000.0,
                            max_position_embeddings=40960, rms_norm_eps=1e-6),
             "qwen", CHATML_TEMPLATE, "tokenizer_config", "<|im_end|>",
             {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
             ("<|im_end|>", "<|endoftext|>"), hf_dtype="bfloat16", shards=3),
        Tiny("phi3", _base("phi3", "Phi3ForCausalLM", max_position_embeddings=512, original_max_position_embeddings=16,
                           sliding_window=262144, rope_scaling={
                               "type": "longrope",
                               "long_factor": [1.0, 1.3, 1.9, 2.6, 3.4, 4.5, 6.0, 8.0],
                               "short_factor": [1.0, 1.05, 1.1, 1.2, 1.3, 1.5, 1.7, 2.0]}),
             "llama_sp", PHI3_TEMPLATE, "json", "<|end|>",
             {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>"},
             ("<|endoftext|>", "<|end|>"),
             added_tokens=("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"), hf_dtype="bfloat16"),
        Tiny("phi4_mini", _base("phi3", "Phi3ForCausalLM", num_key_value_heads=4, partial_rotary_factor=0.75,
                                tie_word_embeddings=True, max_position_embeddings=131072,
                                original_max_position_embeddings=4096, rope_scaling={
                                    "type": "longrope",
                                    "long_factor": [1.0, 1.4, 2.2, 3.5, 5.0, 7.5],
                                    "short_factor": [1.0, 1.2, 1.5, 1.9, 2.4, 3.0]}),
             "llama3", PHI3_TEMPLATE.replace("<|end|>", "<|eot_id|>"), "tokenizer_config", "<|eot_id|>",
             {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, ("<|eot_id|>",), hf_dtype="bfloat16"),
        Tiny("gemma", _base("gemma", "GemmaForCausalLM", head_dim=16, num_key_value_heads=4, rms_norm_eps=1e-6,
                            hidden_act="gelu", tie_word_embeddings=True, max_position_embeddings=8192),
             "gemma_sp", GEMMA_TEMPLATE, "tokenizer_config", "<end_of_turn>",
             {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"},
             ("<eos>", "<end_of_turn>"), hf_dtype="bfloat16"),
        Tiny("gemma2", _base("gemma2", "Gemma2ForCausalLM", head_dim=16, query_pre_attn_scalar=16, sliding_window=4096,
                             attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rms_norm_eps=1e-6,
                             hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh",
                             tie_word_embeddings=True, max_position_embeddings=8192),
             "gemma_sp", GEMMA_TEMPLATE, "tokenizer_config", "<end_of_turn>",
             {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"},
             ("<eos>", "<end_of_turn>"), hf_dtype="float32"),
        # Gemma 2 27B scales attention by hidden / heads, not by the head size; GGUF says that only
        # through llama.cpp's layer-count rule, so this one is checked from its Hugging Face folder.
        Tiny("gemma2_query_scale", _base("gemma2", "Gemma2ForCausalLM", head_dim=16, query_pre_attn_scalar=40,
                                         sliding_window=4096, attn_logit_softcapping=50.0,
                                         final_logit_softcapping=30.0, rms_norm_eps=1e-6,
                                         hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True),
             "gemma_sp", GEMMA_TEMPLATE, "tokenizer_config", "<end_of_turn>",
             {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"},
             ("<eos>", "<end_of_turn>"), sources=("hf",)),
        Tiny("gemma3", _base("gemma3_text", "Gemma3ForCausalLM", num_hidden_layers=6, num_key_value_heads=1,
                             head_dim=32, query_pre_attn_scalar=32, sliding_window=512, sliding_window_pattern=6,
                             rope_theta=1_000_000.0, rope_local_base_freq=10000.0,
                             rope_scaling={"rope_type": "linear", "factor": 8.0},
                             rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                             tie_word_embeddings=True, max_position_embeddings=131072),
             "gemma_sp", GEMMA_TEMPLATE, "tokenizer_config", "<end_of_turn>",
             {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"},
             ("<eos>", "<end_of_turn>"), hf_dtype="bfloat16", shards=2),
    ]
}


# Families whose files only the upstream tools write (test_upstream_files.py): no writer or numpy forward here.
UPSTREAM_ONLY = {
    t.name: t for t in [
        Tiny("phi2", {"architectures": ["PhiForCausalLM"], "model_type": "phi", "hidden_size": 64,
                      "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "num_key_value_heads": 4, "partial_rotary_factor": 0.4, "hidden_act": "gelu_new",
                      "layer_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
                      "tie_word_embeddings": False, "qk_layernorm": False},
             "gpt2", PHI2_TEMPLATE, "tokenizer_config", "<|endoftext|>",
             {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
             ("<|endoftext|>",), hf_dtype="float16", sources=("hf", "gguf")),
        Tiny("gemma4", {"architectures": ["Gemma4ForCausalLM"], "model_type": "gemma4_text", "hidden_size": 64,
                        "intermediate_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "head_dim": 16, "global_head_dim": 32, "num_global_key_value_heads": 1,
                        "attention_k_eq_v": True, "hidden_size_per_layer_input": 0, "sliding_window": 512,
                        "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
                        "tie_word_embeddings": True, "max_position_embeddings": 131072},
             "gemma4", GEMMA4_TEMPLATE, "jinja", "<turn|>",
             {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"},
             ("<eos>", "<turn|>"), hf_dtype="bfloat16", sources=("hf", "gguf"), extra_vocab=0),  # llama.cpp: rows = tokens
    ]
}


# Tokenizer files -----------------------------------------------------------------
def tokenizer_tokens(tiny: Tiny) -> list[str]:
    """The tokenizer's tokens by id (before the embedding's extra rows)."""
    spec = TOKENIZERS[tiny.tokenizer]
    if spec.kind in ("bpe", "spbpe"):
        data = json.loads(bpe_tokenizer_json(tiny.tokenizer))
        by_id = {i: t for t, i in data["model"]["vocab"].items()}
        by_id.update({t["id"]: t["content"] for t in data["added_tokens"]})
        return [by_id[i] for i in range(len(by_id))]
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_proto=sentencepiece_model(tiny.tokenizer))
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())] + list(tiny.added_tokens)


def vocab_size(tiny: Tiny) -> int:
    return len(tokenizer_tokens(tiny)) + tiny.extra_vocab


def write_tokenizer_files(tiny: Tiny, folder: str) -> None:
    tokens = tokenizer_tokens(tiny)
    spec = TOKENIZERS[tiny.tokenizer]
    config: dict = {k: v for k, v in tiny.special_tokens.items()}
    if spec.kind in ("bpe", "spbpe"):
        with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(bpe_tokenizer_json(tiny.tokenizer))
        config["tokenizer_class"] = {"phi3": "GPT2Tokenizer", "gemma4_text": "GemmaTokenizer"}.get(
            tiny.model_type, "PreTrainedTokenizerFast")
        config["added_tokens_decoder"] = {
            str(tokens.index(s)): {"content": s, "special": True, "normalized": False} for s in spec.specials}
    else:
        with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
            f.write(sentencepiece_model(tiny.tokenizer))
        config["tokenizer_class"] = "GemmaTokenizer" if tiny.tokenizer.startswith("gemma") else "LlamaTokenizer"
        config["add_bos_token"], config["add_eos_token"] = True, False
        specials = list(spec.control) + list(spec.user_defined) + list(tiny.added_tokens)
        config["added_tokens_decoder"] = {
            str(tokens.index(s)): {"content": s, "special": True, "normalized": False} for s in specials}
    if tiny.template_in == "tokenizer_config":
        config["chat_template"] = tiny.template
    elif tiny.template_in == "jinja":
        with open(os.path.join(folder, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(tiny.template)
    else:
        with open(os.path.join(folder, "chat_template.json"), "w", encoding="utf-8") as f:
            json.dump({"chat_template": tiny.template}, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    generation = {"eos_token_id": [tokens.index(t) for t in tiny.generation_eos]}
    if tiny.special_tokens.get("bos_token"):
        generation["bos_token_id"] = tokens.index(tiny.special_tokens["bos_token"])
    with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation, f, indent=2)


def full_config(tiny: Tiny) -> dict:
    tokens = tokenizer_tokens(tiny)
    config = dict(tiny.config, vocab_size=vocab_size(tiny))
    if tiny.special_tokens.get("bos_token"):
        config["bos_token_id"] = tokens.index(tiny.special_tokens["bos_token"])
    if TOKENIZERS[tiny.tokenizer].kind in ("sp", "spbpe"):  # as their config.json files have it: one id
        config["eos_token_id"] = tokens.index(tiny.special_tokens["eos_token"])
    else:
        config["eos_token_id"] = [tokens.index(t) for t in tiny.generation_eos]
    return config


# Weights ---------------------------------------------------------------------------
def representable(x: np.ndarray) -> np.ndarray:
    """Round to bfloat16 precision and zero what float16 cannot hold, so all storage types agree exactly."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    bits = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    y = bits.view(np.float32).copy()
    y[np.abs(y) < 2.0 ** -14] = 0.0
    return y


def random_weights(tiny: Tiny, seed: int = 0) -> dict[str, np.ndarray]:
    """Hugging Face tensors of the model, by name (tied models have no lm_head, as transformers saves them)."""
    c = full_config(tiny)
    rng = np.random.default_rng(seed)
    H, F, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]
    D = c.get("head_dim") or H // nh
    gemma = tiny.model_type.startswith("gemma")

    def linear(out, inp):
        return rng.standard_normal((out, inp)) / math.sqrt(inp)

    def norm(n):
        return 0.1 * rng.standard_normal(n) if gemma else 1.0 + 0.1 * rng.standard_normal(n)

    w = {"model.embed_tokens.weight": 0.5 * rng.standard_normal((V, H)), "model.norm.weight": norm(H)}
    if not c["tie_word_embeddings"]:
        w["lm_head.weight"] = linear(V, H)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(H)
        w[p + "post_attention_layernorm.weight"] = norm(H)
        if tiny.model_type == "phi3":
            w[p + "self_attn.qkv_proj.weight"] = linear((nh + 2 * nkv) * D, H)
            w[p + "mlp.gate_up_proj.weight"] = linear(2 * F, H)
        else:
            w[p + "self_attn.q_proj.weight"] = linear(nh * D, H)
            w[p + "self_attn.k_proj.weight"] = linear(nkv * D, H)
            w[p + "self_attn.v_proj.weight"] = linear(nkv * D, H)
            w[p + "mlp.gate_proj.weight"] = linear(F, H)
            w[p + "mlp.up_proj.weight"] = linear(F, H)
        if tiny.model_type == "qwen2":
            for n, rows in (("q", nh * D), ("k", nkv * D), ("v", nkv * D)):
                w[f"{p}self_attn.{n}_proj.bias"] = 0.2 * rng.standard_normal(rows)
        if tiny.model_type in ("qwen3", "gemma3_text"):
            w[p + "self_attn.q_norm.weight"] = norm(D)
            w[p + "self_attn.k_norm.weight"] = norm(D)
        if gemma and tiny.model_type != "gemma":  # Gemma 2 and 3: norms after each block too
            w[p + "pre_feedforward_layernorm.weight"] = norm(H)
            w[p + "post_feedforward_layernorm.weight"] = norm(H)
        w[p + "self_attn.o_proj.weight"] = linear(H, nh * D)
        w[p + "mlp.down_proj.weight"] = linear(H, F)
    return {name: representable(t) for name, t in w.items()}


def rigged_weights(tiny: Tiny, terminator: str) -> dict[str, np.ndarray]:
    """Weights under which every next token is ``terminator``: attention and FFN outputs are zero, so the
    final state is the (positive) embedding of the current token, and only the terminator's output row
    is large and positive."""
    w = random_weights(tiny, seed=1)
    gemma = tiny.model_type.startswith("gemma")
    term = tokenizer_tokens(tiny).index(terminator)
    for name in w:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w[name][:] = 0.0
        elif name.endswith("norm.weight"):
            w[name] = np.abs(w[name]) + (0.0 if gemma else 0.5)
    w["model.embed_tokens.weight"] = representable(np.abs(w["model.embed_tokens.weight"]) + 0.05)
    head_name = "lm_head.weight" if "lm_head.weight" in w else "model.embed_tokens.weight"
    head = w[head_name] * 0.1
    head[term] = 0.5
    w[head_name] = representable(head)
    return w


# Hugging Face folder -----------------------------------------------------------------
def _write_safetensors(path: str, tensors: dict[str, np.ndarray], dtype: str) -> None:
    if dtype != "bfloat16":
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v.astype(dtype)) for k, v in tensors.items()}, path)
        return
    # numpy has no bfloat16: write the documented layout (u64 header size, JSON header, data) by hand.
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        raw = (np.ascontiguousarray(t, dtype=np.float32).view(np.uint32) >> np.uint32(16)).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def write_hf_folder(tiny: Tiny, folder: str, weights: dict[str, np.ndarray]) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(full_config(tiny), f, indent=2)
    names = list(weights)
    if tiny.shards == 1:
        _write_safetensors(os.path.join(folder, "model.safetensors"), weights, tiny.hf_dtype)
    else:
        weight_map = {}
        for s in range(tiny.shards):
            shard = f"model-{s + 1:05d}-of-{tiny.shards:05d}.safetensors"
            part = names[s::tiny.shards]
            _write_safetensors(os.path.join(folder, shard), {n: weights[n] for n in part}, tiny.hf_dtype)
            weight_map.update({n: shard for n in part})
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    write_tokenizer_files(tiny, folder)
    return folder


# GGUF, as convert_hf_to_gguf.py writes it ------------------------------------------------
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
             "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}
FTYPES = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
          "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
QTYPES = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16,
          "Q8_0": gguf.GGMLQuantizationType.Q8_0}


def llama_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """LlamaModel.permute."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _gguf_vocab(tiny: Tiny, folder: str, writer: gguf.GGUFWriter, n_vocab: int) -> None:
    """_set_vocab_gpt2 / _set_vocab_sentencepiece (and Phi3MiniModel.set_vocab), then gguf.SpecialVocab."""
    spec = TOKENIZERS[tiny.tokenizer]
    if spec.kind == "bpe":
        data = json.loads(bpe_tokenizer_json(tiny.tokenizer))
        reverse = {i: t for t, i in data["model"]["vocab"].items()}
        added = {t["id"]: t for t in data["added_tokens"]}
        tokens, types = [], []
        for i in range(n_vocab):
            if i in added:
                tokens.append(added[i]["content"])
                types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
            elif i in reverse:
                tokens.append(reverse[i])
                types.append(gguf.TokenType.NORMAL)
            else:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("llama-bpe" if tiny.tokenizer == "llama3" else "qwen2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.SpecialVocab(folder, load_merges=True).add_to_gguf(writer, quiet=True)
        return
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))
    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores, types = [-10000.0] * n_vocab, [gguf.TokenType.UNUSED] * n_vocab
    for i in range(sp.vocab_size()):
        kind = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        tokens[i], scores[i], types[i] = sp.id_to_piece(i).encode(), sp.get_score(i), kind
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        for token_id, data in json.load(f).get("added_tokens_decoder", {}).items():
            token_id = int(token_id)
            types[token_id] = gguf.TokenType.CONTROL if data.get("special") else gguf.TokenType.USER_DEFINED
            scores[token_id], tokens[token_id] = -1000.0, data["content"].encode()
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    if tiny.model_type.startswith("gemma"):
        writer.add_add_space_prefix(False)


def _gguf_parameters(tiny: Tiny, c: dict, writer: gguf.GGUFWriter, ftype: str) -> None:
    """set_gguf_parameters of the family's model class."""
    mt = tiny.model_type
    nh = c["num_attention_heads"]
    head_dim = c.get("head_dim")
    rope = c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type")
    if mt == "phi3":  # Phi3MiniModel.set_gguf_parameters
        rope_dims = int(c.get("partial_rotary_factor", 1.0) * c["hidden_size"]) // nh
        writer.add_context_length(c["max_position_embeddings"])
        writer.add_rope_scaling_orig_ctx_len(c["original_max_position_embeddings"])
        writer.add_embedding_length(c["hidden_size"])
        writer.add_feed_forward_length(c["intermediate_size"])
        writer.add_block_count(c["num_hidden_layers"])
        writer.add_head_count(nh)
        writer.add_head_count_kv(c["num_key_value_heads"])
        writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
        writer.add_rope_dimension_count(rope_dims)
        writer.add_rope_freq_base(c["rope_theta"])
        writer.add_file_type(FTYPES[ftype])
        writer.add_sliding_window(c.get("sliding_window") or 0)
        return
    if mt in ("gemma", "gemma2"):  # GemmaModel/Gemma2Model.set_gguf_parameters (no rope base: llama.cpp's 10000)
        writer.add_context_length(c["max_position_embeddings"])
        writer.add_embedding_length(c["hidden_size"])
        writer.add_block_count(c["num_hidden_layers"])
        writer.add_feed_forward_length(c["intermediate_size"])
        writer.add_head_count(nh)
        writer.add_head_count_kv(c["num_key_value_heads"])
        writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_file_type(FTYPES[ftype])
        if mt == "gemma":
            return
        writer.add_attn_logit_softcapping(c["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(c["final_logit_softcapping"])
        writer.add_sliding_window(c["sliding_window"])
        return
    # TextModel.set_gguf_parameters
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(c["hidden_size"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(nh)
    writer.add_head_count_kv(c["num_key_value_heads"])
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_rope_freq_base(c["rope_theta"])
    if "rope_local_base_freq" in c:
        writer.add_rope_freq_base_swa(c["rope_local_base_freq"])
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    if head_dim is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(FTYPES[ftype])
    if mt in ("llama", "mistral"):  # LlamaModel
        writer.add_vocab_size(c["vocab_size"])
        writer.add_rope_dimension_count(head_dim or c["hidden_size"] // nh)
    if mt == "gemma3_text":  # Gemma3Model
        if c.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(c["final_logit_softcapping"])
        if c.get("sliding_window_pattern") != 1:
            writer.add_sliding_window(c["sliding_window"])


def extra_tensors(tiny: Tiny, c: dict) -> dict[str, np.ndarray]:
    """generate_extra_tensors: rope_freqs (LlamaModel), rope_factors_long/short (Phi3MiniModel)."""
    rope = c.get("rope_scaling") or {}
    rope_type = (rope.get("rope_type") or rope.get("type") or "").lower()
    if tiny.model_type in ("llama", "mistral") and rope_type == "llama3":
        dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        freqs = 1.0 / (c["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        factors = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < old / high:
                factors.append(1)
            elif wavelen > old / low:
                factors.append(factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        return {"rope_freqs.weight": np.asarray(factors, dtype=np.float32)}
    if tiny.model_type == "phi3" and rope.get("long_factor"):  # (and add_rope_scaling_attn_factors, in write_gguf)
        return {"rope_factors_long.weight": np.asarray(rope["long_factor"], dtype=np.float32),
                "rope_factors_short.weight": np.asarray(rope["short_factor"], dtype=np.float32)}
    return {}


def gguf_stored_weights(tiny: Tiny, weights: dict[str, np.ndarray], ftype: str) -> dict[str, np.ndarray]:
    """The Hugging Face weights as a GGUF of ``ftype`` holds them (after its quantization, if any)."""
    out = {}
    for name, t in weights.items():
        if _gguf_qtype(name, t, ftype) == gguf.GGMLQuantizationType.Q8_0:
            q = gguf.quants.quantize(t.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            t = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(t.shape)
        out[name] = t
    return out


def _gguf_qtype(name: str, t: np.ndarray, ftype: str) -> gguf.GGMLQuantizationType:
    if t.ndim <= 1 or name.endswith("norm.weight") or not name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    if ftype == "Q8_0" and t.shape[-1] % 32:
        return gguf.GGMLQuantizationType.F16  # llama.cpp's fallback when rows do not fill blocks
    return QTYPES[ftype]


def gguf_writer(tiny: Tiny, path: str, folder: str) -> gguf.GGUFWriter:
    """A GGUFWriter holding the family's metadata and vocabulary, tensors still to add."""
    writer = gguf.GGUFWriter(path, GGUF_ARCH[tiny.model_type])
    writer.add_name(f"tiny {tiny.name}")
    _gguf_parameters(tiny, full_config(tiny), writer, tiny.gguf_ftype)
    _gguf_vocab(tiny, folder, writer, full_config(tiny)["vocab_size"])
    return writer


def write_gguf(tiny: Tiny, path: str, folder: str, weights: dict[str, np.ndarray]) -> str:
    """``convert_hf_to_gguf.py --outtype <tiny.gguf_ftype>`` on the folder written by :func:`write_hf_folder`."""
    c = full_config(tiny)
    arch = GGUF_ARCH[tiny.model_type]
    ftype = tiny.gguf_ftype
    writer = gguf_writer(tiny, path, folder)
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c["num_hidden_layers"])
    tensors = dict(extra_tensors(tiny, c))
    if "rope_factors_long.weight" in tensors:
        scale = c["max_position_embeddings"] / c["original_max_position_embeddings"]
        orig = c["original_max_position_embeddings"]
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0)
    nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]
    for name, t in weights.items():
        t = t.astype(np.float32)
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            t = llama_permute(t, nh)
        if arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            t = llama_permute(t, nkv)
        if arch.startswith("gemma") and name == "lm_head.weight":
            continue
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            t = t + 1
        new_name = tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new_name is not None, name
        tensors[new_name] = (name, t)
    for new_name, item in tensors.items():
        name, t = item if isinstance(item, tuple) else (new_name, item)
        qtype = _gguf_qtype(new_name if not isinstance(item, tuple) else name, t, ftype)
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            writer.add_tensor(new_name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(new_name, t.astype(np.float16))
        else:
            writer.add_tensor(new_name, t.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
