"""Encoder conversion (BERT, XLM-RoBERTa, DistilBERT from Hugging Face folders, without torch) and the encoder
engine, checked against an independent numpy forward pass of the same random weights."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from tiny_encoders import TINY_ENCODERS, build, reference_embedding, reference_logits

from llm_blueprint.convert import convert_model
from llm_blueprint.engine.encoder import EncoderEngine, EncoderModel, EncoderOptions, relevance
from llm_blueprint.errors import InvalidRequest

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.", "tokens",
         "Numbers like 12345 appear in text, as do dates such as 2024-05-17, and she said hello to the world."]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (tiny, weights, float32 dir, int8 dir)."""
    root = tmp_path_factory.mktemp("encoders")
    out = {}
    for name, tiny in TINY_ENCODERS.items():
        weights = build(tiny, str(root / name))
        f32 = convert_model(str(root / name), str(root / f"{name}-f32"), quantization="float32", show_progress=False)
        i8 = convert_model(str(root / name), str(root / f"{name}-int8"), quantization="int8", show_progress=False)
        out[name] = (tiny, weights, str(root / name), f32, i8)
    return out


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _engine(path: str, compute_type: str = "float32", **options) -> EncoderEngine:
    model = EncoderModel(path, EncoderOptions(device="cpu", compute_type=compute_type, intra_threads=1))
    return EncoderEngine(model, EncoderOptions(**options))


@pytest.mark.parametrize("name", ["bert-embed", "bert-embed-mean", "xlmr-embed"])
def test_embeddings_match_the_numpy_reference(converted, name):
    tiny, weights, _, f32, _ = converted[name]
    engine = _engine(f32)
    try:
        inputs = engine.model.encode_texts(TEXTS, None, "input")
        vectors = engine.embed(inputs)  # one batch of mixed lengths: padding must not change anything
        for item, vector in zip(inputs, vectors, strict=True):
            expected = reference_embedding(tiny, weights, item.ids)
            assert _cosine(vector, expected) >= 0.9999
            assert np.allclose(np.linalg.norm(vector), 1.0, atol=1e-4) == tiny.normalize
        alone = engine.embed(inputs[:1])[0]
        assert _cosine(alone, vectors[0]) >= 0.99999
    finally:
        engine.shutdown()


@pytest.mark.parametrize("name", ["bert-rerank", "xlmr-rerank", "distilbert-rerank"])
def test_rerank_logits_match_the_numpy_reference(converted, name):
    tiny, weights, _, f32, _ = converted[name]
    engine = _engine(f32)
    try:
        inputs = engine.model.encode_pairs("What is the capital of France?", TEXTS, None)
        if tiny.model_type == "bert":  # [CLS] query [SEP] document [SEP], the document's tokens of type 1
            assert inputs[0].type_ids[0] == 0 and inputs[0].type_ids[-1] == 1
        logits = engine.logits(inputs)
        assert logits.shape == (len(TEXTS), tiny.num_labels)
        expected = np.stack([reference_logits(tiny, weights, item.ids, item.type_ids or [0] * len(item.ids))
                             for item in inputs])
        assert _cosine(logits, expected) >= 0.9999
        assert np.allclose(logits, expected, atol=2e-3 * max(1.0, np.abs(expected).max()))
        scores = relevance(logits)
        assert np.all((scores > 0) & (scores < 1))
    finally:
        engine.shutdown()


def test_int8_serving_stays_close_to_float32(converted):
    _, _, _, f32, i8 = converted["bert-embed"]
    exact, quantized = _engine(f32), _engine(i8, compute_type="int8")
    try:
        a = exact.embed(exact.model.encode_texts(TEXTS, None, "input"))
        b = quantized.embed(quantized.model.encode_texts(TEXTS, None, "input"))
        assert min(_cosine(x, y) for x, y in zip(a, b, strict=True)) > 0.98
    finally:
        exact.shutdown()
        quantized.shutdown()


def test_the_converted_directory_says_what_the_model_is(converted):
    for name, (tiny, _, _, f32, _) in converted.items():
        with open(os.path.join(f32, "encoder.json")) as f:
            meta = json.load(f)
        assert meta["kind"] == ("rerank" if tiny.head else "embedding"), name
        assert meta["max_length"] == tiny.positions
        if not tiny.head:
            assert (meta["pooling"], meta["normalize"]) == (tiny.pooling, tiny.normalize)
            assert meta["pooling_source"] == "1_Pooling/config.json"
        assert os.path.isfile(os.path.join(f32, "llm_blueprint.json"))


def test_limits_and_truncation(converted):
    engine = _engine(converted["bert-embed"][3], max_batch_size=2, max_batch_tokens=40)
    model = engine.model
    try:
        long_text = " ".join(["capital"] * 300)
        with pytest.raises(InvalidRequest) as error:
            model.encode_texts(["short", long_text], None, "input")
        assert error.value.param == "input[1]" and error.value.code == "context_length_exceeded"
        cut = model.encode_texts([long_text], -1, "input")[0]
        assert len(cut.ids) == model.max_length and cut.ids[-1] == model.tokenizer.token_to_id("[SEP]")
        assert len(model.encode_texts([long_text], 10, "input")[0].ids) == 10
        pairs = model.encode_pairs("capital of France", [long_text], 16)
        assert len(pairs[0].ids) == 16
        with pytest.raises(InvalidRequest):
            model.token_inputs([[1, 2, 10**6]], None, "input")
        # batches respect their limits: 5 inputs -> at least 3 forward passes of <= 2 inputs
        before = len(engine.batch_sizes)
        engine.embed(model.encode_texts(TEXTS + ["one more"], None, "input"))
        sizes = engine.batch_sizes[before:]
        assert sum(sizes) == 5 and max(sizes) <= 2
    finally:
        engine.shutdown()


def test_pooling_can_be_overridden(converted):
    tiny, weights, _, f32, _ = converted["bert-embed"]
    model = EncoderModel(f32, EncoderOptions(device="cpu", compute_type="float32", pooling="mean", normalize=False))
    engine = EncoderEngine(model)
    try:
        item = model.encode_texts(["Paris is the capital of France."], None, "input")[0]
        vector = engine.embed([item])[0]
        from tiny_encoders import reference_states

        expected = reference_states(tiny, weights, item.ids).mean(0)
        assert _cosine(vector, expected) >= 0.9999 and not np.isclose(np.linalg.norm(vector), 1.0)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("ftype, floor", [("F32", 0.9999), ("Q8_0", 0.999)])
def test_bert_gguf_as_llama_cpp_writes_it(converted, tmp_path, ftype, floor):
    """A BERT embedding model in llama.cpp's GGUF layout converts to the same model (the tokenizer rebuilt from the
    phantom-space vocabulary splits text as the original WordPiece did)."""
    from tiny_encoders import write_bert_gguf

    from llm_blueprint.registry import model_kind

    tiny, weights, folder, _, _ = converted["bert-embed"]
    path = write_bert_gguf(tiny, weights, str(tmp_path / "bert.gguf"), ftype)
    assert model_kind(path) == "embedding"
    out = convert_model(path, str(tmp_path / "from-gguf"), quantization="float32", show_progress=False)
    engine = _engine(out)
    try:
        original = _engine(converted["bert-embed"][3])
        try:
            want = original.model.encode_texts(TEXTS, None, "input")
        finally:
            original.shutdown()
        got = engine.model.encode_texts(TEXTS, None, "input")
        assert [g.ids for g in got] == [w.ids for w in want]
        for item, vector in zip(got, engine.embed(got), strict=True):
            assert _cosine(vector, reference_embedding(tiny, weights, item.ids)) >= floor
    finally:
        engine.shutdown()


def test_embedding_batches_never_block_the_gevent_hub(tmp_path):
    """Forward passes run on native threads: a ticker greenlet keeps ticking while they run, however long each is."""
    import subprocess
    import sys

    from tiny_encoders import TinyEncoder

    tiny = TinyEncoder("probe", "bert", hidden=256, layers=4, heads=4, ffn=1024, positions=128)
    build(tiny, str(tmp_path / "probe"))
    out = convert_model(str(tmp_path / "probe"), str(tmp_path / "probe-f32"), quantization="float32", show_progress=False)
    here = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, os.path.join(here, "encoder_probe.py"), out], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": os.path.dirname(here)})
    assert run.returncode == 0, run.stderr
    probe = json.loads(run.stdout.strip().splitlines()[-1])
    assert probe["done"] == 18 and probe["forwards"] >= 3
    # a forward pass on the hub would stall the ticker for the whole pass
    assert probe["longest_forward"] > 0.15, probe
    assert probe["max_gap"] < max(0.12, probe["longest_forward"] / 2), probe
