"""Every supported family converts exactly from the files the upstream tools write, against transformers itself.

The other family tests (``test_model_families.py``) write their files with this
project's own code and check them against a numpy forward pass written here;
both could share a wrong assumption. These take the world's files instead
(``reference_env``): a random-weight model built and saved by transformers
(``save_pretrained``, with its tokenizer saved by transformers too), the GGUF
that llama.cpp's own ``convert_hf_to_gguf.py`` writes from that folder, and
transformers' float32 logits of the saved model as the oracle.

Per family and source: float32 logits within 1e-3 of transformers, the
tokenizer's ids equal to transformers' (BOS included), the chat template
rendering what transformers renders, and the end-of-turn tokens known.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import reference_env
from tiny_models import CORPUS, FAMILIES, UPSTREAM_ONLY, full_config, tokenizer_tokens, write_tokenizer_files

from llm_blueprint.convert import convert_model
from llm_blueprint.engine import Model, ModelOptions
from llm_blueprint.errors import ConversionError

TOLERANCE = 1e-3
ALL_FAMILIES = {**FAMILIES, **UPSTREAM_ONLY}
MESSAGES = [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Germany?"}]
# Characters the tiny tokenizers never saw (byte fallback, or the unknown token), and runs of spaces.
OUTSIDE_THE_VOCABULARY = "Grüße aus 日本 🦙 —  two  spaces,\ttab\n\nand newlines"
# GGUF outtypes written per Hugging Face dtype: float32 always, and the checkpoint's own type where GGUF has it.
OUTTYPES = {"float32": ["f32"], "float16": ["f32", "f16"], "bfloat16": ["f32", "bf16"]}
# llama.cpp's name of each byte-level BPE tokenizer's pre-tokenizer (the tiny ones use the real split rules).
BPE_PRE = {"llama3": "llama-bpe", "qwen": "qwen2", "gpt2": "phi-2"}
# Oracle variants: transformers run again on the same saved weights with a config change.
VARIANTS = {
    # CTranslate2 has no attention soft-capping (checked apart below).
    "gemma2": {"exact": {"attn_logit_softcapping": None}},
    # GGUF cannot say query_pre_attn_scalar; llama.cpp scales by the head size (27B: hidden / heads).
    # Gemma 4's global layers rotate a quarter of their head ("proportional"): the whole head, to show it is seen.
    "gemma4": {"full_rotary": {"rope_parameters": {
        "full_attention": {"partial_rotary_factor": 1.0, "rope_theta": 1_000_000.0, "rope_type": "proportional"},
        "sliding_attention": {"rope_theta": 10_000.0, "rope_type": "default"}}}},
    "gemma2_query_scale": {"exact": {"attn_logit_softcapping": None},
                           "llama_cpp_rule": {"attn_logit_softcapping": None, "query_pre_attn_scalar": 16}},
}


def _ids(name: str, length: int = 40) -> list[int]:
    return [int(i) for i in np.random.default_rng(5).integers(0, len(tokenizer_tokens(ALL_FAMILIES[name])), length)]


def _job(name: str, root: str) -> dict:
    tiny = ALL_FAMILIES[name]
    tokenizer = os.path.join(root, "tokenizers", name)
    os.makedirs(tokenizer, exist_ok=True)
    write_tokenizer_files(tiny, tokenizer)
    config = {k: v for k, v in full_config(tiny).items() if k not in ("architectures", "model_type")}
    pad = tiny.special_tokens.get("pad_token")  # transformers' defaults (Phi-3: 32000) lie outside a tiny vocabulary
    config["pad_token_id"] = tokenizer_tokens(tiny).index(pad) if pad else None
    return {
        "name": name, "out": os.path.join(root, name), "model_type": tiny.model_type, "config": config,
        "dtype": tiny.hf_dtype, "gguf": _sources(name)[1:], "tokenizer": tokenizer, "ids": _ids(name),
        "texts": CORPUS[:10] + [OUTSIDE_THE_VOCABULARY], "messages": MESSAGES, "end_tokens": list(tiny.generation_eos),
        "variants": VARIANTS.get(name, {}), "bpe_pre": BPE_PRE.get(tiny.tokenizer, ""),
    }


class Upstream:
    """The upstream files of every family, built once (cached across runs), and their conversions."""

    def __init__(self, root: str):
        self.root = root
        self.jobs = {name: _job(name, root) for name in ALL_FAMILIES}
        reference_env.build(list(self.jobs.values()), os.path.join(root, "work"))
        self._models: dict = {}

    def reference(self, name: str) -> dict:
        with open(os.path.join(self.jobs[name]["out"], "reference.json"), encoding="utf-8") as f:
            return json.load(f)

    def logits(self, name: str, variant: str | None = None) -> np.ndarray:
        suffix = f"-{variant}" if variant else ""
        return np.load(os.path.join(self.jobs[name]["out"], f"logits{suffix}.npy"))

    def source(self, name: str, source: str) -> str:
        out = self.jobs[name]["out"]
        return os.path.join(out, "hf") if source == "hf" else os.path.join(out, f"model-{source}.gguf")

    def model(self, name: str, source: str) -> Model:
        key = (name, source)
        if key not in self._models:
            out = os.path.join(self.root, "ct2", f"{name}-{source}")
            convert_model(self.source(name, source), out, quantization="float32", force=True, show_progress=False)
            self._models[key] = Model(out, ModelOptions(device="cpu", compute_type="float32", intra_threads=1))
        return self._models[key]

    def close(self) -> None:
        for model in self._models.values():
            model.close()


@pytest.fixture(scope="module")
def upstream():
    root = os.path.join(reference_env.CACHE, "upstream-files")
    shop = Upstream(root)
    yield shop
    shop.close()


def _sources(name: str) -> list[str]:
    tiny = ALL_FAMILIES[name]
    gguf = name in FAMILIES or "gguf" in tiny.sources  # llama.cpp writes every family of FAMILIES
    return ["hf"] + (OUTTYPES[tiny.hf_dtype] if gguf else [])


CASES = [pytest.param(name, source, id=f"{name}-{source}") for name in ALL_FAMILIES for source in _sources(name)]


def _logits(model: Model, ids: list[int]) -> np.ndarray:
    return np.asarray(model.generator.forward_batch([model.tokenizer.ids_to_tokens(ids)]))[0]


def _expected(upstream: Upstream, name: str, source: str) -> np.ndarray:
    variants = {k: v for k, v in VARIANTS.get(name, {}).items() if k in ("exact", "llama_cpp_rule")}
    if source != "hf" and "llama_cpp_rule" in variants:
        return upstream.logits(name, "llama_cpp_rule")
    return upstream.logits(name, "exact" if "exact" in variants else None)


@pytest.mark.parametrize("name,source", CASES)
def test_float32_logits_match_transformers(upstream, name, source):
    ids = upstream.jobs[name]["ids"]
    logits = _logits(upstream.model(name, source), ids)
    expected = _expected(upstream, name, source)
    assert logits.shape == expected.shape
    delta = float(np.abs(logits - expected).max())
    print(f"max |Δlogit| {name} from {source}: {delta:.1e}")
    assert delta <= TOLERANCE
    assert (logits.argmax(-1) == expected.argmax(-1)).all()


@pytest.mark.parametrize("name,source", CASES)
def test_tokenizer_chat_template_and_end_tokens_match_transformers(upstream, name, source):
    model = upstream.model(name, source)
    reference = upstream.reference(name)
    bos = model.tokenizer.token_to_id(model.bos_token) if model.bos_token else None
    for text, ids, decoded in zip(upstream.jobs[name]["texts"], reference["text_ids"], reference["decoded"], strict=True):
        assert model.tokenizer.encode(text, add_special_tokens=True) == ids, text
        assert model.tokenizer.decode(ids[1:] if ids[:1] == [bos] else ids) == decoded
    assert model.render_chat(MESSAGES) == reference["chat"]
    assert set(reference["end_ids"]) <= model.end_token_ids


def test_gemma4_proportional_rotary_is_seen(upstream):
    """The logits test above would notice a global layer rotating its whole head instead of Gemma 4's quarter."""
    ids = upstream.jobs["gemma4"]["ids"]
    logits = _logits(upstream.model("gemma4", "hf"), ids)
    assert np.abs(logits - upstream.logits("gemma4", "full_rotary")).max() > 10 * TOLERANCE


def test_gemma2_gguf_follows_llama_cpps_attention_scale(upstream):
    """GGUF has no key for Gemma 2's query_pre_attn_scalar: llama.cpp scales attention by the head size (the
    27B's 46 layers: hidden / heads), which every released Gemma 2 satisfies. A file of a model that does not
    (this one: 40 against a head size of 16) means, in llama.cpp as here, the head-size scale."""
    model = upstream.model("gemma2_query_scale", "f32")
    ids = upstream.jobs["gemma2_query_scale"]["ids"]
    logits = _logits(model, ids)
    assert np.abs(logits - upstream.logits("gemma2_query_scale", "llama_cpp_rule")).max() <= TOLERANCE
    assert np.abs(logits - upstream.logits("gemma2_query_scale", "exact")).max() > 10 * TOLERANCE


@pytest.mark.parametrize("name", ["gemma2", "gemma2_query_scale"])
def test_gemma2_attention_softcapping_is_the_measured_gap(upstream, name):
    """CTranslate2 has no attention soft-capping: against transformers with the cap the logits move, by the
    size recorded in docs/converting-models.md for these weights."""
    ids = upstream.jobs[name]["ids"]
    delta = float(np.abs(_logits(upstream.model(name, "hf"), ids) - upstream.logits(name)).max())
    print(f"max |Δlogit| {name} against transformers with attention soft-capping: {delta:.1e}")
    assert delta > TOLERANCE


@pytest.mark.parametrize("change,named", [
    ({"hidden_size_per_layer_input": 256}, "per-layer input embeddings"),
    ({"num_kv_shared_layers": 2}, "key/value states shared between layers"),
    ({"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 32}, "mixture-of-experts"),
])
def test_gemma4_variants_ctranslate2_cannot_run_are_refused_by_name(upstream, tmp_path, change, named):
    """E2B/E4B (per-layer inputs, shared key/value states) and 26B-A4B (experts): a clear error, not a wrong model."""
    folder = tmp_path / "gemma4"
    shutil.copytree(upstream.source("gemma4", "hf"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConversionError, match=named):
        convert_model(str(folder), str(tmp_path / "out"), quantization="float32", show_progress=False)
