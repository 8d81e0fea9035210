"""Rebuild the model's own tokenizer from the GGUF vocabulary.

- ``tokenizer.ggml.model = gpt2``: byte-level BPE written as a Hugging Face
  ``tokenizer.json`` (vocabulary, merges, the pre-tokenizer split rules named
  by ``tokenizer.ggml.pre``, control tokens as special added tokens).
- ``tokenizer.ggml.model = llama``: a real SentencePiece ``tokenizer.model``
  (BPE type) rebuilt from the pieces, scores and token types.
- ``tokenizer.ggml.model = gemma4``: Gemma 4's ``tokenizer.json`` (SentencePiece-
  style BPE over the text with spaces as ``▁``, merges, byte fallback) rebuilt
  from the vocabulary and merges llama.cpp's converter copied out of it.

Both also get a ``tokenizer_config.json`` carrying the chat template and the
special tokens, the way Hugging Face ships them.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..errors import ConversionError
from .gguf_file import GGUFFile
from .source import Vocabulary, fit_to_embeddings

# GGUF token types (llama.cpp's llama_token_type), identical to SentencePiece's.
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's split: Llama 3's with digits one at a time.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# o200k (GPT-4o, Phi-4-mini), as its tokenizer.json writes it.
GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre values -> (split digits one by one first, split regex), as llama.cpp's llama-vocab.cpp maps them
BPE_PRE_TOKENIZERS = {
    "default": (False, GPT2_SPLIT),
    "gpt-2": (False, GPT2_SPLIT),
    "phi-2": (False, GPT2_SPLIT),
    "smollm": (True, GPT2_SPLIT),
    "starcoder": (True, GPT2_SPLIT),
    "refact": (True, GPT2_SPLIT),
    "llama-bpe": (False, LLAMA3_SPLIT),
    "llama3": (False, LLAMA3_SPLIT),
    "llama-v3": (False, LLAMA3_SPLIT),
    "dbrx": (False, LLAMA3_SPLIT),  # Phi-4
    "smaug-bpe": (False, LLAMA3_SPLIT),
    "gpt-4o": (False, GPT4O_SPLIT),  # Phi-4-mini
    "qwen2": (False, QWEN2_SPLIT),
    "deepseek-r1-qwen": (False, QWEN2_SPLIT),
}

GGUF_SAMPLING = {"temp": "temperature", "top_p": "top_p", "top_k": "top_k", "penalty_repeat": "repetition_penalty"}

def _token_text(tokens: list[str], token_id: Any) -> str | None:
    if token_id is None:
        return None
    token_id = int(token_id)
    return tokens[token_id] if 0 <= token_id < len(tokens) else None


def special_tokens(gguf: GGUFFile, tokens: list[str]) -> dict[str, str | None]:
    return {
        name: _token_text(tokens, gguf.field(f"tokenizer.ggml.{name}_token_id"))
        for name in ("bos", "eos", "unk", "padding")
    }


def _write_bpe_tokenizer_json(gguf: GGUFFile, tokens: list[str], types, out_dir: str, add_bos: bool, bos: str | None) -> None:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    pre = gguf.field("tokenizer.ggml.pre", "default")
    if pre not in BPE_PRE_TOKENIZERS:
        raise ConversionError(
            f"{gguf.path}: BPE pre-tokenizer {pre!r} is not supported; "
            f"supported: {', '.join(sorted(BPE_PRE_TOKENIZERS))}"
        )
    split_digits, split_regex = BPE_PRE_TOKENIZERS[pre]
    merges = [tuple(m.split(" ", 1)) for m in gguf.string_array("tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    steps += [
        pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [
        AddedToken(tok, special=True, normalized=False)
        for tok, kind in zip(tokens, types, strict=False)
        if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
    ]
    tokenizer.add_special_tokens(specials)
    if add_bos and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))


def _write_gemma4_tokenizer_json(gguf: GGUFFile, tokens: list[str], types, out_dir: str, add_bos: bool,
                                 bos: str | None, unk: str | None) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    merges = [tuple(m.split(" ", 1)) for m in gguf.string_array("tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens([
        AddedToken(tok, special=True, normalized=False)
        for tok, kind in zip(tokens, types, strict=False) if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
    ])
    if add_bos and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))


def _write_sentencepiece_model(gguf: GGUFFile, tokens: list[str], types, out_dir: str, ids: dict) -> None:
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    scores = gguf.number_array("tokenizer.ggml.scores")
    if scores is None:
        raise ConversionError(f"{gguf.path}: SentencePiece vocabulary has no scores")
    model = sp_pb2.ModelProto()
    trainer = model.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = bool((types == TOKEN_BYTE).any())
    trainer.unk_id = int(ids.get("unk", 0) if ids.get("unk") is not None else 0)
    trainer.bos_id = int(ids["bos"]) if ids.get("bos") is not None else -1
    trainer.eos_id = int(ids["eos"]) if ids.get("eos") is not None else -1
    trainer.pad_id = int(ids["padding"]) if ids.get("padding") is not None else -1
    trainer.treat_whitespace_as_suffix = False
    trainer.allow_whitespace_only_pieces = True
    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(gguf.field("tokenizer.ggml.add_space_prefix", True))
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    existing = set(tokens)
    for piece_text, score, kind in zip(tokens, scores, types, strict=False):
        piece = model.pieces.add()
        if kind == TOKEN_USER_DEFINED and " " in piece_text:
            # llama.cpp's converter stores Hugging Face's added-token text here
            # (literal spaces); SentencePiece matches pieces after escaping
            # spaces to U+2581, so the piece must be stored escaped to be reachable.
            escaped = piece_text.replace(" ", "\u2581")
            piece_text = escaped if escaped not in existing else piece_text
        piece.piece = piece_text
        piece.score = float(score)
        piece.type = int(kind) if int(kind) in (1, 2, 3, 4, 5, 6) else TOKEN_NORMAL
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(model.SerializeToString())


def write_tokenizer_files(gguf: GGUFFile, out_dir: str, context_length: int, rows: int | None = None) -> Vocabulary:
    """Write tokenizer files plus ``tokenizer_config.json`` and ``generation_config.json``; the vocabulary returned
    has ``rows`` entries (the embedding's rows past the tokenizer's own tokens are named ``<extra_id_N>``).

    ``generation_config.json`` lists the end-of-generation ids: EOS, and the
    end-of-turn (``eot``) and end-of-message (``eom``) tokens when the file names them.
    """
    tokens = gguf.string_array("tokenizer.ggml.tokens")
    if not tokens:
        raise ConversionError(f"{gguf.path}: the GGUF file carries no tokenizer vocabulary")
    types = gguf.number_array("tokenizer.ggml.token_type")
    if types is None:
        import numpy as np

        types = np.full(len(tokens), TOKEN_NORMAL)
    kind = gguf.field("tokenizer.ggml.model")
    specials = special_tokens(gguf, tokens)
    ids = {name: gguf.field(f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "unk", "padding")}
    add_bos = bool(gguf.field("tokenizer.ggml.add_bos_token", kind == "llama"))
    if kind == "gpt2":
        _write_bpe_tokenizer_json(gguf, tokens, types, out_dir, add_bos, specials["bos"])
    elif kind == "llama":
        _write_sentencepiece_model(gguf, tokens, types, out_dir, ids)
    elif kind == "gemma4":
        _write_gemma4_tokenizer_json(gguf, tokens, types, out_dir, add_bos, specials["bos"], specials["unk"])
    else:
        raise ConversionError(f"{gguf.path}: tokenizer model {kind!r} is not supported (gpt2, llama, gemma4)")

    config: dict[str, Any] = {
        "add_bos_token": add_bos,
        "add_eos_token": bool(gguf.field("tokenizer.ggml.add_eos_token", False)),
        "bos_token": specials["bos"],
        "eos_token": specials["eos"],
        "unk_token": specials["unk"],
        "pad_token": specials["padding"],
        "model_max_length": context_length,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "LlamaTokenizer" if kind == "llama" else "PreTrainedTokenizerFast",
    }
    template = gguf.field("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)

    end_ids = [ids["eos"], gguf.field("tokenizer.ggml.eot_token_id"), gguf.field("tokenizer.ggml.eom_token_id")]
    end_ids = list(dict.fromkeys(int(i) for i in end_ids if i is not None and 0 <= int(i) < len(tokens)))
    generation = {
        "bos_token_id": int(ids["bos"]) if ids["bos"] is not None else None,
        "eos_token_id": end_ids[0] if len(end_ids) == 1 else (end_ids or None),
    }
    for key, name in GGUF_SAMPLING.items():  # the recommended sampling newer GGUF files carry
        value = gguf.field(f"general.sampling.{key}")
        if isinstance(value, (int, float)):
            generation[name] = value
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation, f, indent=2)
    if rows is not None and rows > len(tokens):  # embeddings padded past the tokenizer (as real models pad them)
        tokens = fit_to_embeddings(tokens, rows, gguf.path)
    return Vocabulary(tokens=tokens, bos=specials["bos"], eos=specials["eos"], unk=specials["unk"])
