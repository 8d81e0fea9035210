"""The Gemma families' spec builders: Gemma 2 and 3 (scaled embeddings, (1 + weight) norms before and after each
block, sliding-window layers) and Gemma 4 (plain norms, global layers of their own shape, proportional rotary)."""

from __future__ import annotations

import logging

import numpy as np

from ..errors import ConversionError
from .source import ModelSource
from .spec_parts import ACTIVATIONS, Spec, Weights, embeddings_and_head, from_config, gated_mlp, progress, qkv

log = logging.getLogger(__name__)


def _gemma(source: ModelSource, quantization: str, show_progress: bool, qk_norm: bool) -> Spec:
    """Gemma 2 and 3: scaled embeddings, (1 + weight) norms before and after each block,
    sliding-window layers, GELU-tanh; Gemma 2 soft-caps the logits, Gemma 3 norms Q and K."""
    config = source.config
    spec = from_config(config, pre_post_layer_norm=True, qk_norm=qk_norm)
    decoder = spec.decoder
    decoder.scale_embeddings = True
    decoder.start_from_zero_embedding = False
    if config.final_logit_softcapping:
        decoder.final_logit_softcapping = np.float32(config.final_logit_softcapping)
    queries_scale = None
    if config.query_pre_attn_scalar and config.query_pre_attn_scalar != config.head_dim:
        queries_scale = np.float32(config.query_pre_attn_scalar ** -0.5)
    with progress(config, show_progress) as bar:
        w = Weights(source, quantization, bar)
        embeddings_and_head(decoder, w, gemma_norm=True)
        for i, layer in enumerate(decoder.layer):
            p = f"model.layers.{i}."
            attention = layer.self_attention
            sliding = config.is_sliding(i)
            if config.sliding_window:
                attention.sliding_window = np.int32(config.sliding_window if sliding else 0)
            if sliding and config.local_rope_theta is not None:
                attention.rotary_base = np.float32(config.local_rope_theta)
                if config.rope_scaling is not None and config.rope_scaling.kind == "linear":
                    attention.rotary_scaling_factor = np.float32(1.0)  # scaling is for the global layers only
            if queries_scale is not None:
                attention.queries_scale = queries_scale
            norms = [
                (layer.input_layer_norm, "input_layernorm"),
                (layer.post_attention_layer_norm, "post_attention_layernorm"),
                (layer.pre_feedforward_layer_norm, "pre_feedforward_layernorm"),
                (layer.post_feedforward_layer_norm, "post_feedforward_layernorm"),
            ]
            if qk_norm:
                norms += [(attention.q_norm, "self_attn.q_norm"), (attention.k_norm, "self_attn.k_norm")]
            for norm, name in norms:
                norm.gamma = w(f"{p}{name}.weight")
                norm.layer_norm_use_residual = True
            attention.linear[0].weight = qkv(w, p, "weight")
            attention.linear[1].weight = w(p + "self_attn.o_proj.weight")
            gated_mlp(layer.ffn, w, p)
            w.finish(layer)
    return spec


def build_gemma2_spec(source: ModelSource, quantization: str, show_progress: bool = True) -> Spec:
    config = source.config
    if config.rope_scaling is not None:
        raise ConversionError(f"{source.path}: Gemma 2 with rope scaling is not supported")
    if config.attn_logit_softcapping:
        # CTranslate2 has no attention soft-capping (its own Gemma 2 converter drops it too): scores
        # well inside the cap are barely changed by it, large ones are no longer bounded.
        log.warning("%s: Gemma 2's attention logit soft-capping (%s) is not supported by CTranslate2 and is "
                    "left out; final logit soft-capping is kept", source.path, config.attn_logit_softcapping)
    return _gemma(source, quantization, show_progress, qk_norm=False)


def build_gemma3_spec(source: ModelSource, quantization: str, show_progress: bool = True) -> Spec:
    config = source.config
    if config.rope_scaling is not None and config.rope_scaling.kind != "linear":
        raise ConversionError(f"{source.path}: Gemma 3 with {config.rope_scaling.kind} rope scaling is not supported")
    return _gemma(source, quantization, show_progress, qk_norm=True)


def _proportional_permutation(head_dim: int, rotary_dim: int) -> np.ndarray | None:
    """Gemma 4's proportional rotary pairs channel i with i + head / 2 for i < rotary / 2 (transformers' halves of the
    whole head, the frequencies beyond rotary / 2 being zero); CTranslate2 rotates the first ``rotary_dim`` channels,
    pairing i with i + rotary / 2. This order of a head's channels turns one into the other (as CTranslate2's own
    Gemma 4 converter does)."""
    if not 0 < rotary_dim < head_dim:
        return None
    half, quarter = head_dim // 2, rotary_dim // 2
    return np.concatenate([np.arange(quarter), np.arange(half, half + quarter),
                           np.arange(quarter, half), np.arange(half + quarter, head_dim)])


def _permute_heads(weight: np.ndarray, head_dim: int, order: np.ndarray) -> np.ndarray:
    heads = weight.reshape(-1, head_dim, *weight.shape[1:])
    return np.ascontiguousarray(heads[:, order].reshape(weight.shape))


def build_gemma4_spec(source: ModelSource, quantization: str, show_progress: bool = True) -> Spec:
    """Gemma 4 (dense): Gemma 3's layout with plain-weight norms, a value norm without weights, no attention
    scale, a scalar per layer, and global layers with their own head size, key/value heads, values equal to the
    keys (attention_k_eq_v) and proportional partial rotary."""
    config = source.config
    if config.rope_scaling is not None:
        raise ConversionError(f"{source.path}: Gemma 4 with rope scaling is not supported")
    spec = Spec.from_config(
        config.num_layers, config.num_heads, activation=ACTIVATIONS[config.activation], pre_norm=True, ffn_glu=True,
        rms_norm=True, rotary_dim=config.head_dim, rotary_interleave=False,
        rotary_base=config.local_rope_theta or config.rope_theta,
        num_heads_kv=config.num_kv_heads if config.num_kv_heads != config.num_heads else None,
        head_dim=config.head_dim, sliding_window=config.sliding_window or None, pre_post_layer_norm=True,
        qk_norm=True, v_norm=True,
    )
    decoder = spec.decoder
    decoder.sliding_window = np.int32(0)  # windows are per layer
    decoder.scale_embeddings = True
    decoder.start_from_zero_embedding = False
    if config.final_logit_softcapping:
        decoder.final_logit_softcapping = np.float32(config.final_logit_softcapping)
    global_dim, global_rotary = config.global_head_dim, config.global_rotary_dim or config.global_head_dim
    # CTranslate2's frequencies are base^(-2i / rotary_dim), transformers' theta^(-2i / head_dim): same base for both
    global_base = config.rope_theta ** (global_rotary / global_dim)
    order = _proportional_permutation(global_dim, global_rotary)
    with progress(config, show_progress) as bar:
        w = Weights(source, quantization, bar)
        embeddings_and_head(decoder, w)
        for i, layer in enumerate(decoder.layer):
            p = f"model.layers.{i}."
            attention = layer.self_attention
            attention.queries_scale = np.float32(1.0)
            sliding = config.is_sliding(i)
            head_dim = config.head_dim if sliding else global_dim
            if sliding:
                attention.sliding_window = np.int32(config.sliding_window)
            else:
                attention.sliding_window = np.int32(0)
                attention.head_dim = np.int32(global_dim)
                attention.num_heads_kv = np.int32(config.global_kv_heads)
                attention.rotary_dim = np.int32(global_rotary)
                attention.rotary_base = np.float32(global_base)
            for norm, name in [(layer.input_layer_norm, "input_layernorm"),
                               (layer.post_attention_layer_norm, "post_attention_layernorm"),
                               (layer.pre_feedforward_layer_norm, "pre_feedforward_layernorm"),
                               (layer.post_feedforward_layer_norm, "post_feedforward_layernorm")]:
                norm.gamma = w(f"{p}{name}.weight")
            q, k = w(p + "self_attn.q_proj.weight"), w(p + "self_attn.k_proj.weight")
            v = k.copy() if not sliding and config.attention_k_eq_v else w(p + "self_attn.v_proj.weight")
            q_norm, k_norm = w(p + "self_attn.q_norm.weight"), w(p + "self_attn.k_norm.weight")
            if not sliding and order is not None:
                q, k = _permute_heads(q, head_dim, order), _permute_heads(k, head_dim, order)
                q_norm, k_norm = q_norm[order], k_norm[order]
            attention.linear[0].weight = np.concatenate([q, k, v], axis=0)
            attention.q_norm.gamma, attention.k_norm.gamma = q_norm, k_norm
            attention.v_norm.gamma = np.ones(head_dim, dtype=np.float32)
            attention.linear[1].weight = w(p + "self_attn.o_proj.weight")
            gated_mlp(layer.ffn, w, p)
            if w.has(p + "layer_scalar"):
                layer.layer_scalar = np.float32(w(p + "layer_scalar").reshape(-1)[0])
            w.finish(layer)
    return spec
