"""A Hugging Face folder's tokenizer, carried into the converted directory.

- ``tokenizer.json`` (byte-level BPE, or any ``tokenizers`` model) is copied
  as it is.
- ``tokenizer.model`` alone (SentencePiece) is copied too; tokens the folder
  adds on top of it (``added_tokens_decoder``, ``added_tokens.json``, e.g.
  Phi-3's ``<|end|>``) are written into the SentencePiece model as control or
  user-defined pieces, so that they encode and decode as single tokens.
- ``tokenizer_config.json`` (special tokens completed from
  ``special_tokens_map.json``), the chat template (``chat_template.jinja``,
  ``chat_template.json`` or the one in ``tokenizer_config.json``) and
  ``generation_config.json`` (made from ``config.json`` when absent) follow.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from ..errors import ConversionError
from .source import Vocabulary, fit_to_embeddings

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
PIECE_NORMAL, PIECE_CONTROL, PIECE_USER_DEFINED, PIECE_UNUSED = 1, 3, 4, 5


def _load_json(path: str) -> Any:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read {path}: {exc}") from exc


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _added_tokens(folder: str, tokenizer_config: dict[str, Any]) -> dict[int, tuple[str, bool]]:
    """id -> (text, special) for tokens added on top of the base vocabulary."""
    added: dict[int, tuple[str, bool]] = {}
    for text, token_id in (_load_json(os.path.join(folder, "added_tokens.json")) or {}).items():
        added[int(token_id)] = (text, False)
    for token_id, data in (tokenizer_config.get("added_tokens_decoder") or {}).items():
        if isinstance(data, dict) and isinstance(data.get("content"), str):
            added[int(token_id)] = (data["content"], bool(data.get("special")))
    return added


def _tokens_from_tokenizer_json(path: str) -> list[str | None]:
    data = _load_json(path)
    model = data.get("model") or {}
    vocab = model.get("vocab")
    by_id: dict[int, str] = {}
    if isinstance(vocab, dict):
        by_id.update({int(i): tok for tok, i in vocab.items()})
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        by_id.update({i: entry[0] for i, entry in enumerate(vocab)})
    else:
        raise ConversionError(f"{path}: tokenizer model {model.get('type')!r} has no vocabulary")
    for token in data.get("added_tokens") or []:
        by_id[int(token["id"])] = token["content"]
    tokens: list[str | None] = [None] * (max(by_id) + 1 if by_id else 0)
    for i, tok in by_id.items():
        tokens[i] = tok
    return tokens


def _write_sentencepiece(source: str, out_path: str, added: dict[int, tuple[str, bool]]) -> list[str | None]:
    """Copy ``tokenizer.model``, adding the folder's added tokens as pieces; return the pieces by id."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    model = sp_pb2.ModelProto()
    with open(source, "rb") as f:
        model.ParseFromString(f.read())
    changed = False
    for token_id in sorted(added):
        text, special = added[token_id]
        kind = PIECE_CONTROL if special else PIECE_USER_DEFINED
        if token_id < len(model.pieces):
            piece = model.pieces[token_id]
            if piece.piece == text:
                continue
        else:
            while len(model.pieces) < token_id:  # ids the folder skips stay unused
                filler = model.pieces.add()
                filler.piece, filler.score, filler.type = f"<unused_added_{len(model.pieces) - 1}>", 0.0, PIECE_UNUSED
            piece = model.pieces.add()
        piece.piece, piece.score, piece.type = text, 0.0, kind
        changed = True
    if changed:
        with open(out_path, "wb") as f:
            f.write(model.SerializeToString())
    else:
        shutil.copyfile(source, out_path)
    return [p.piece for p in model.pieces]


def write_tokenizer_files(folder: str, out_dir: str, hf_config: dict[str, Any], vocab_size: int) -> Vocabulary:
    """Write the folder's tokenizer files into ``out_dir`` and return the vocabulary (``vocab_size`` rows)."""
    tokenizer_config = _load_json(os.path.join(folder, "tokenizer_config.json")) or {}
    special_map = _load_json(os.path.join(folder, "special_tokens_map.json")) or {}
    json_path, sp_path = os.path.join(folder, "tokenizer.json"), os.path.join(folder, "tokenizer.model")
    if os.path.isfile(json_path):
        shutil.copyfile(json_path, os.path.join(out_dir, "tokenizer.json"))
        raw_tokens = _tokens_from_tokenizer_json(json_path)
    elif os.path.isfile(sp_path):
        raw_tokens = _write_sentencepiece(sp_path, os.path.join(out_dir, "tokenizer.model"),
                                          _added_tokens(folder, tokenizer_config))
        tokenizer_config.setdefault("add_bos_token", True)  # LlamaTokenizer's and GemmaTokenizer's default
    else:
        raise ConversionError(f"{folder}: no tokenizer found; looked for tokenizer.json and tokenizer.model")
    tokens = fit_to_embeddings(raw_tokens, vocab_size, folder)

    generation = _load_json(os.path.join(folder, "generation_config.json"))
    if generation is None:
        generation = {k: hf_config.get(k) for k in ("bos_token_id", "eos_token_id") if hf_config.get(k) is not None}

    def by_id(value: Any) -> str | None:
        return tokens[value] if isinstance(value, int) and 0 <= value < len(tokens) else None

    for name in SPECIAL_NAMES:
        if _token_text(tokenizer_config.get(name)) is None and _token_text(special_map.get(name)) is not None:
            tokenizer_config[name] = _token_text(special_map[name])
    specials = {name: _token_text(tokenizer_config.get(name)) for name in SPECIAL_NAMES}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id")):
        if specials[name] is None:
            ids = generation.get(key, hf_config.get(key))
            specials[name] = by_id(ids[0] if isinstance(ids, list) and ids else ids)
            if specials[name] is not None:
                tokenizer_config[name] = specials[name]

    template_json = _load_json(os.path.join(folder, "chat_template.json"))
    template_path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(template_path):
        shutil.copyfile(template_path, os.path.join(out_dir, "chat_template.jinja"))
    elif isinstance(template_json, dict) and isinstance(template_json.get("chat_template"), str):
        with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(template_json["chat_template"])

    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, ensure_ascii=False, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation, f, indent=2)

    return Vocabulary(tokens=tokens, bos=specials["bos_token"], eos=specials["eos_token"], unk=specials["unk_token"])
