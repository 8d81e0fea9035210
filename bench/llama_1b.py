"""A model of Llama-3.2-1B's shape with random weights, for benchmarks whose speed does not depend on the values.

16 layers, hidden 2048, 32 heads, 8 KV heads, FFN 8192, rope base 500000,
tied embeddings. Weights are seeded per tensor name (the same file every
time) and scaled by 1/sqrt(fan-in) (std ≈ 0.02 for the 2048-wide inputs) so
that activations stay finite. :func:`write_f16_tensors` streams them into a
GGUF F16 file the way llama.cpp's converter lays them out (Q/K rows in the
interleaved rotary order), one tensor in memory at a time.

:func:`smollm2_vocab_gguf` is such a file with SmolLM2's tokenizer (49,152
tokens, copied from the default model's GGUF), what bench/peer.py serves.
"""

from __future__ import annotations

import os
import zlib

import gguf
import numpy as np

LAYERS, HIDDEN, HEADS, KV_HEADS, FFN = 16, 2048, 32, 8, 8192
ROPE_THETA = 500000.0
RMS_EPS = 1e-5
CONTEXT = 131072


def tensor_shapes(vocab: int) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names and shapes (tied embeddings: no ``lm_head.weight``)."""
    head_dim = HIDDEN // HEADS
    shapes = {"model.embed_tokens.weight": (vocab, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HEADS * head_dim, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * head_dim),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN), p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN),
        })
    return shapes


def tensor(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The tensor's seeded random values: norms near 1, matrices with std 1/sqrt(fan-in)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    if len(shape) == 1:
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(1 / np.sqrt(shape[1]))


def _llama_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: Q/K rows into the interleaved rotary order."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_f16_tensors(writer: gguf.GGUFWriter, vocab: int, extra: dict[str, np.ndarray] | None = None) -> None:
    """Write the header, the metadata already added to ``writer``, and every tensor (matrices F16, norms and
    ``extra`` F32), streamed; then close the file."""
    shapes = tensor_shapes(vocab)
    extra = extra or {}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    plan = [(names.get_name(n, try_suffixes=(".weight",)), n) for n in shapes]
    for name, t in extra.items():
        writer.add_tensor_info(name, t.shape, np.dtype(np.float32), t.nbytes)
    for gguf_name, name in plan:
        dtype = np.dtype(np.float32 if len(shapes[name]) == 1 else np.float16)
        writer.add_tensor_info(gguf_name, shapes[name], dtype, int(np.prod(shapes[name])) * dtype.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in extra.values():
        writer.write_tensor_data(t)
    for _, name in plan:
        data = tensor(name, shapes[name])
        if name.endswith("q_proj.weight"):
            data = _llama_permute(data, HEADS)
        elif name.endswith("k_proj.weight"):
            data = _llama_permute(data, KV_HEADS)
        writer.write_tensor_data(data if data.ndim == 1 else data.astype(np.float16))
    writer.close()


def smollm2_vocab_gguf(path: str) -> str:
    """The 1B shape with the default model's tokenizer and chat template, as an F16 GGUF at ``path`` (written
    once: an existing file is kept)."""
    if os.path.isfile(path):
        return path
    from llm_blueprint.engine.default_model import default_gguf_path

    source = gguf.GGUFReader(default_gguf_path())
    temporary = f"{path}.{os.getpid()}.tmp"
    writer = gguf.GGUFWriter(temporary, "llama")
    writer.add_name("random weights, Llama-3.2-1B shape, SmolLM2 tokenizer")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    vocab = 0
    for key, field in source.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, field.types[0])
        if key == "tokenizer.ggml.tokens":
            vocab = len(value)
    writer.add_vocab_size(vocab)
    write_f16_tensors(writer, vocab)
    os.replace(temporary, path)
    return path
