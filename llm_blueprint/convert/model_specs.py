"""Build CTranslate2 decoder specs from GGUF tensors, one builder per architecture.

GGUF weight conventions that matter here (llama.cpp's converter writes them):

- ``llama``: Q and K projections are stored in the interleaved (Meta) rotary
  layout, so the raw weights are used with ``rotary_interleave=True``.
- ``gemma3``: rotary is the NeoX "halves" layout (``rotary_interleave=False``);
  every ``*norm.weight`` already has Gemma's ``+1`` folded in, so the gammas
  are used as they are (no ``layer_norm_use_residual``); every sixth layer
  uses global attention with the global rotary base, the others a sliding
  window with base 10000 (llama.cpp hard-codes both for this architecture).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from ctranslate2.specs import common_spec, transformer_spec
from tqdm import tqdm

from ..errors import ConversionError
from .gguf_file import GGUFFile

GEMMA3_SLIDING_WINDOW_PATTERN = 6
GEMMA3_LOCAL_ROPE_BASE = 10000.0


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, leave=False)


def _fused_qkv(gguf: GGUFFile, prefix: str) -> np.ndarray:
    return np.concatenate(
        [gguf.tensor(f"{prefix}.attn_q.weight"), gguf.tensor(f"{prefix}.attn_k.weight"),
         gguf.tensor(f"{prefix}.attn_v.weight")],
        axis=0,
    )


def _set_embeddings_and_head(decoder, gguf: GGUFFile, bar: tqdm) -> None:
    """Input embeddings, final norm and output projection (tied when the GGUF has no ``output.weight``)."""
    embeddings = gguf.tensor("token_embd.weight")
    decoder.embeddings.weight = embeddings
    decoder.layer_norm.gamma = gguf.tensor("output_norm.weight")
    # Tied embeddings: the same array object lets CTranslate2 alias the variable.
    decoder.projection.weight = gguf.tensor("output.weight") if gguf.has_tensor("output.weight") else embeddings
    bar.update(2)


def build_llama_spec(gguf: GGUFFile, show_progress: bool = True) -> transformer_spec.TransformerDecoderModelSpec:
    num_layers = int(gguf.arch_field("block_count"))
    num_heads = int(gguf.arch_field("attention.head_count"))
    num_heads_kv = int(gguf.arch_field("attention.head_count_kv", num_heads))
    scaling = gguf.arch_field("rope.scaling.type")
    if scaling not in (None, "none") or gguf.has_tensor("rope_freqs.weight"):
        raise ConversionError(f"{gguf.path}: rotary scaling {scaling or 'rope_freqs'!r} is not supported")

    spec = transformer_spec.TransformerDecoderModelSpec.from_config(
        num_layers,
        num_heads,
        activation=common_spec.Activation.SWISH,
        pre_norm=True,
        ffn_glu=True,
        rms_norm=True,
        rotary_dim=0,
        rotary_interleave=True,
        rotary_base=float(gguf.arch_field("rope.freq_base", 10000.0)),
        num_heads_kv=None if num_heads_kv == num_heads else num_heads_kv,
    )
    decoder = spec.decoder
    decoder.scale_embeddings = False
    with _progress(2 + num_layers * 9, "tensors", show_progress) as bar:
        _set_embeddings_and_head(decoder, gguf, bar)
        for i, layer in enumerate(decoder.layer):
            p = f"blk.{i}"
            layer.self_attention.layer_norm.gamma = gguf.tensor(f"{p}.attn_norm.weight")
            layer.self_attention.linear[0].weight = _fused_qkv(gguf, p)
            layer.self_attention.linear[1].weight = gguf.tensor(f"{p}.attn_output.weight")
            layer.ffn.layer_norm.gamma = gguf.tensor(f"{p}.ffn_norm.weight")
            layer.ffn.linear_0.weight = gguf.tensor(f"{p}.ffn_gate.weight")
            layer.ffn.linear_0_noact.weight = gguf.tensor(f"{p}.ffn_up.weight")
            layer.ffn.linear_1.weight = gguf.tensor(f"{p}.ffn_down.weight")
            bar.update(9)
    spec.config.layer_norm_epsilon = float(gguf.arch_field("attention.layer_norm_rms_epsilon", 1e-5))
    return spec


def build_gemma3_spec(gguf: GGUFFile, show_progress: bool = True) -> transformer_spec.TransformerDecoderModelSpec:
    num_layers = int(gguf.arch_field("block_count"))
    num_heads = int(gguf.arch_field("attention.head_count"))
    num_heads_kv = int(gguf.arch_field("attention.head_count_kv", num_heads))
    head_dim = int(gguf.arch_field("attention.key_length"))
    sliding_window = int(gguf.arch_field("attention.sliding_window", 0))
    global_base = float(gguf.arch_field("rope.freq_base", 1_000_000.0))

    spec = transformer_spec.TransformerDecoderModelSpec.from_config(
        num_layers,
        num_heads,
        activation=common_spec.Activation.GELUTanh,
        pre_norm=True,
        ffn_glu=True,
        rms_norm=True,
        rotary_dim=head_dim,
        rotary_interleave=False,
        rotary_base=GEMMA3_LOCAL_ROPE_BASE,
        num_heads_kv=None if num_heads_kv == num_heads else num_heads_kv,
        head_dim=head_dim,
        sliding_window=sliding_window,
        pre_post_layer_norm=True,
        qk_norm=True,
    )
    decoder = spec.decoder
    decoder.scale_embeddings = True
    decoder.start_from_zero_embedding = False
    with _progress(2 + num_layers * 13, "tensors", show_progress) as bar:
        _set_embeddings_and_head(decoder, gguf, bar)
        for i, layer in enumerate(decoder.layer):
            p = f"blk.{i}"
            attention = layer.self_attention
            if (i + 1) % GEMMA3_SLIDING_WINDOW_PATTERN == 0:
                attention.rotary_base = np.float32(global_base)
                attention.sliding_window = np.int32(0)
            else:
                attention.rotary_base = np.float32(GEMMA3_LOCAL_ROPE_BASE)
                attention.sliding_window = np.int32(sliding_window)
            layer.input_layer_norm.gamma = gguf.tensor(f"{p}.attn_norm.weight")
            layer.post_attention_layer_norm.gamma = gguf.tensor(f"{p}.post_attention_norm.weight")
            layer.pre_feedforward_layer_norm.gamma = gguf.tensor(f"{p}.ffn_norm.weight")
            layer.post_feedforward_layer_norm.gamma = gguf.tensor(f"{p}.post_ffw_norm.weight")
            attention.q_norm.gamma = gguf.tensor(f"{p}.attn_q_norm.weight")
            attention.k_norm.gamma = gguf.tensor(f"{p}.attn_k_norm.weight")
            attention.linear[0].weight = _fused_qkv(gguf, p)
            attention.linear[1].weight = gguf.tensor(f"{p}.attn_output.weight")
            layer.ffn.linear_0.weight = gguf.tensor(f"{p}.ffn_gate.weight")
            layer.ffn.linear_0_noact.weight = gguf.tensor(f"{p}.ffn_up.weight")
            layer.ffn.linear_1.weight = gguf.tensor(f"{p}.ffn_down.weight")
            bar.update(13)
    spec.config.layer_norm_epsilon = float(gguf.arch_field("attention.layer_norm_rms_epsilon", 1e-6))
    return spec


SPEC_BUILDERS: dict[str, Callable[..., transformer_spec.TransformerDecoderModelSpec]] = {
    "llama": build_llama_spec,
    "gemma3": build_gemma3_spec,
}


def context_length(gguf: GGUFFile) -> int:
    return int(gguf.arch_field("context_length", 2048))
