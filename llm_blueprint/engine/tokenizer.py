"""One tokenizer interface over Hugging Face ``tokenizer.json`` and SentencePiece.

CTranslate2 takes tokens as strings from its own ``vocabulary.json``; this
interface maps text ↔ ids ↔ those strings, and decodes ids back to text.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

from ..errors import ModelLoadError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte ↔ printable character table (byte-level BPE vocabularies are written in it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_UNICODE_TO_BYTE = _byte_level_alphabet()


class Tokenizer:
    """Encode/decode text for one model directory.

    ``vocabulary`` is CTranslate2's token list (id → token string).
    """

    def __init__(self, vocabulary: list[str], bos_token: str | None, add_bos_token: bool):
        self.vocabulary = vocabulary
        self._token_to_id = {token: i for i, token in enumerate(vocabulary)}
        self.bos_token = bos_token
        self.add_bos_token = add_bos_token

    # Implemented by each backend -------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text, special tokens dropped."""
        raise NotImplementedError

    def special_token_ids(self) -> list[int]:
        """Ids of control tokens (turn markers, BOS/EOS): never part of text, and never written by a text constraint."""
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a part of a multi-byte character stays that part)."""
        piece = self.vocabulary[token_id]
        byte = _BYTE_PIECE.fullmatch(piece)
        if byte:  # SentencePiece / Metaspace byte fallback
            return bytes([int(byte.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    # Shared ------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Encode ``text``; with ``add_special_tokens`` a BOS is prepended when the model wants one.

        Chat templates write their own BOS, so rendered chats are encoded
        without special tokens, as Hugging Face does.
        """
        ids = self._encode(text)
        bos_id = self.token_to_id(self.bos_token) if self.bos_token else None
        if add_special_tokens and self.add_bos_token and bos_id is not None and ids[:1] != [bos_id]:
            ids = [bos_id, *ids]
        return ids

    def token_to_id(self, token: str) -> int | None:
        return self._token_to_id.get(token)

    def ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """CTranslate2 token strings for ``ids``."""
        vocabulary = self.vocabulary
        return [vocabulary[i] for i in ids]

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)


class HFTokenizer(Tokenizer):
    """``tokenizer.json`` through the ``tokenizers`` library."""

    def __init__(self, path: str, vocabulary: list[str], bos_token: str | None, add_bos_token: bool):
        from tokenizers import Tokenizer as _Tokenizer

        super().__init__(vocabulary, bos_token, add_bos_token)
        self._tokenizer = _Tokenizer.from_file(path)
        self._has_post_processor = self._tokenizer.post_processor is not None
        with open(path, encoding="utf-8") as f:
            decoder = json.load(f).get("decoder") or {}
        self._byte_level = "ByteLevel" in json.dumps(decoder)  # GPT-2 style: each byte is one printable character

    def _encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if add_special_tokens and self._has_post_processor:
            return self._tokenizer.encode(text, add_special_tokens=True).ids
        return super().encode(text, add_special_tokens)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def special_token_ids(self) -> list[int]:
        return sorted(i for i, token in self._tokenizer.get_added_tokens_decoder().items() if token.special)

    def token_bytes(self, token_id: int) -> bytes:
        if self._byte_level:
            piece = self.vocabulary[token_id]
            if all(ch in _UNICODE_TO_BYTE for ch in piece):
                return bytes(_UNICODE_TO_BYTE[ch] for ch in piece)
        return super().token_bytes(token_id)


class SentencePieceTokenizer(Tokenizer):
    """``tokenizer.model`` through ``sentencepiece``."""

    def __init__(self, path: str, vocabulary: list[str], bos_token: str | None, add_bos_token: bool):
        import sentencepiece

        super().__init__(vocabulary, bos_token, add_bos_token)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        self._control = {i for i in range(self._sp.get_piece_size()) if self._sp.is_control(i)}
        # SentencePiece never produces control pieces from text, but chat
        # templates write them as text ("<bos>", "<start_of_turn>"): split them out
        # first, as Hugging Face tokenizers do with special tokens.
        control_text = sorted((self._sp.id_to_piece(i) for i in self._control), key=len, reverse=True)
        self._control_re = re.compile("|".join(re.escape(t) for t in control_text if t)) if control_text else None

    def _encode(self, text: str) -> list[int]:
        if self._control_re is None:
            return self._sp.encode(text)
        ids: list[int] = []
        start = 0
        for match in self._control_re.finditer(text):
            if match.start() > start:
                ids.extend(self._sp.encode(text[start:match.start()]))
            ids.append(self._sp.piece_to_id(match.group()))
            start = match.end()
        if start < len(text):
            ids.extend(self._sp.encode(text[start:]))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([i for i in ids if i not in self._control])

    def special_token_ids(self) -> list[int]:
        return sorted(self._control)


def load_vocabulary(model_dir: str) -> list[str]:
    """CTranslate2's vocabulary (``vocabulary.json`` or the older ``vocabulary.txt``)."""
    json_path = os.path.join(model_dir, "vocabulary.json")
    if os.path.isfile(json_path):
        with open(json_path, encoding="utf-8") as f:
            return json.load(f)
    txt_path = os.path.join(model_dir, "vocabulary.txt")
    if os.path.isfile(txt_path):
        with open(txt_path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f]
    raise ModelLoadError(f"{model_dir}: no vocabulary.json or vocabulary.txt (is this a CTranslate2 model directory?)")


def load_tokenizer(model_dir: str, vocabulary: list[str], bos_token: str | None, add_bos_token: bool) -> Tokenizer:
    """Pick ``tokenizer.json`` when present, else ``tokenizer.model``."""
    hf_path = os.path.join(model_dir, "tokenizer.json")
    if os.path.isfile(hf_path):
        return HFTokenizer(hf_path, vocabulary, bos_token, add_bos_token)
    sp_path = os.path.join(model_dir, "tokenizer.model")
    if os.path.isfile(sp_path):
        return SentencePieceTokenizer(sp_path, vocabulary, bos_token, add_bos_token)
    raise ModelLoadError(
        f"{model_dir}: no tokenizer found; looked for {' and '.join(TOKENIZER_FILES)}"
    )
