"""The tokenizers rebuilt from GGUF vocabularies reproduce the models' own."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Café, naïve, façade, Ærøskøbing, Straße, señor, İstanbul.",
    "日本語のテキストと中文文本，还有한국어.",
    "Emoji: 😀🎉👩‍👩‍👧‍👦 🇫🇷 ❤️‍🔥",
    "runs   of    spaces\tand\ttabs\n\n\nand newlines\r\n",
    "  leading and trailing spaces  ",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n",
    "Numbers 1234567890 and 3.14159, 1e-10, 0xFF.",
    "<not a special token> & < > \\ / ` ~",
    "",
    " ",
    "\n",
]


def _gguf_tokens(path):
    reader = gguf.GGUFReader(path)
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    types_field = reader.fields["tokenizer.ggml.token_type"]
    types = np.array([types_field.parts[i][0] for i in types_field.data])
    return tokens, types


@pytest.mark.parametrize("text", CORPUS)
def test_gemma3_sentencepiece_round_trips(gemma3_f32, text):
    tokenizer = gemma3_f32.tokenizer
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", CORPUS)
def test_smollm2_bpe_round_trips(smollm2_f32, text):
    tokenizer = smollm2_f32.tokenizer
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_gemma3_every_piece_encodes_to_its_own_id(gemma3_f32, gemma3_gguf):
    tokens, types = _gguf_tokens(gemma3_gguf)
    tokenizer = gemma3_f32.tokenizer
    checked = 0
    mismatches = []
    for token_id, (piece, kind) in enumerate(zip(tokens, types, strict=False)):
        if kind not in (1, 4):  # normal and user-defined pieces are reachable from text
            continue
        text = piece.replace("\u2581", " ")
        ids = tokenizer.encode(text)
        checked += 1
        if ids != [token_id]:
            mismatches.append(piece)
            assert tokenizer.decode(ids) == text
    assert checked == 255_474 + 165
    # SentencePiece BPE merges by score; these four normal pieces cannot be
    # produced by any merge sequence from their own text (the original model
    # and llama.cpp's SPM tokenizer behave the same). Every other piece,
    # user-defined whitespace runs included, encodes to its own id.
    assert sorted(mismatches) == sorted(["\u2581YYYY", "\u2581yyyy", "\u2581diffformul", "\u2581::::::::"])


def test_gemma3_adds_bos_for_raw_prompts(gemma3_f32):
    ids = gemma3_f32.encode_prompt("Hello")
    assert ids[0] == 2 and gemma3_f32.tokenizer.vocabulary[2] == "<bos>"


def test_smollm2_special_tokens_have_the_gguf_ids(smollm2_f32, smollm2_gguf):
    tokens, types = _gguf_tokens(smollm2_gguf)
    specials = [(i, t) for i, (t, kind) in enumerate(zip(tokens, types, strict=False)) if kind == 3]
    assert len(specials) == 17
    for token_id, text in specials:
        assert smollm2_f32.tokenizer.encode(text) == [token_id]
        assert smollm2_f32.tokenizer.token_to_id(text) == token_id
    chat = smollm2_f32.tokenizer.encode("<|im_start|>user\nHi<|im_end|>")
    assert chat[0] == 1 and chat[-1] == 2


def test_smollm2_tokens_are_the_gguf_vocabulary(smollm2_f32, smollm2_gguf):
    tokens, _ = _gguf_tokens(smollm2_gguf)
    ids = smollm2_f32.tokenizer.encode(CORPUS[0] + CORPUS[6])
    assert smollm2_f32.tokenizer.ids_to_tokens(ids) == [tokens[i] for i in ids]
    assert "".join(smollm2_f32.tokenizer.ids_to_tokens(ids)).startswith("Hello,Ġworld!")


def test_smollm2_splits_digits_one_by_one(smollm2_f32):
    tokenizer = smollm2_f32.tokenizer
    assert tokenizer.ids_to_tokens(tokenizer.encode("2024")) == ["2", "0", "2", "4"]
