"""Build CTranslate2 decoder specs, one builder per model family.

Builders read a :class:`ModelSource` (Hugging Face names and layout, whichever
file the model came from) and describe the model with CTranslate2's spec
options, as CTranslate2's own ``transformers`` converter does for each family.
Where that converter cannot say something exactly, the builders do it their
own way:

- Llama 3 rope scaling is given as one divisor per rotary frequency through
  CTranslate2's su/longrope scaling (its ``llama3`` scaling type has no way
  to receive the scaling factor from a spec).
- Phi-3's longrope cos/sin scale (``attention_factor``) is folded into the
  rotary rows of the Q and K projections: rotation is linear, so scaling its
  input equals scaling its output, for any factor the model declares.
- Gemma's norms keep their Hugging Face weights with ``layer_norm_use_residual``
  (gamma = 1 + weight).

The Gemma 2, 3 and 4 builders are in gemma_specs.py, the parts every builder
uses in spec_parts.py.

Weights are quantized layer by layer as they are read, so a float32 copy of
the whole model never exists at once.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import ConversionError
from .gemma_specs import build_gemma2_spec, build_gemma3_spec, build_gemma4_spec
from .source import ModelSource, Vocabulary
from .spec_parts import (
    ACTIVATIONS,
    TIED_EMBEDDINGS,
    Spec,
    Weights,
    embeddings_and_head,
    from_config,
    gated_mlp,
    progress,
    qkv,
    rotary_scale,
    set_frequency_factors,
)


def _llama_like(source: ModelSource, quantization: str, show_progress: bool, qk_norm: bool = False,
                gemma: bool = False) -> Spec:
    """Llama, Mistral, Qwen2 (Q/K/V biases), Qwen3 (Q/K norms): pre-norm, SwiGLU, GQA; Gemma (1): the same
    with GELU-tanh, embeddings scaled by the square root of their width and (1 + weight) norms."""
    config = source.config
    spec = from_config(config, qk_norm=qk_norm)
    decoder = spec.decoder
    decoder.scale_embeddings = gemma
    if gemma:
        decoder.start_from_zero_embedding = False
    with progress(config, show_progress) as bar:
        w = Weights(source, quantization, bar)
        embeddings_and_head(decoder, w, gemma_norm=gemma)
        for i, layer in enumerate(decoder.layer):
            p = f"model.layers.{i}."
            attention = layer.self_attention
            set_frequency_factors(attention, config)
            attention.layer_norm.gamma = w(p + "input_layernorm.weight")
            attention.linear[0].weight = qkv(w, p, "weight")
            if w.has(p + "self_attn.q_proj.bias"):
                attention.linear[0].bias = qkv(w, p, "bias")
            attention.linear[1].weight = w(p + "self_attn.o_proj.weight")
            if qk_norm:
                attention.q_norm.gamma = w(p + "self_attn.q_norm.weight")
                attention.k_norm.gamma = w(p + "self_attn.k_norm.weight")
            layer.ffn.layer_norm.gamma = w(p + "post_attention_layernorm.weight")
            if gemma:
                attention.layer_norm.layer_norm_use_residual = True
                layer.ffn.layer_norm.layer_norm_use_residual = True
            gated_mlp(layer.ffn, w, p)
            w.finish(layer)
    return spec


def build_gemma_spec(source: ModelSource, quantization: str, show_progress: bool = True) -> Spec:
    if source.config.rope_scaling is not None:
        raise ConversionError(f"{source.path}: Gemma with rope scaling is not supported")
    return _llama_like(source, quantization, show_progress, gemma=True)


def build_llama_spec(source: ModelSource, quantization: str, show_progress: bool = True) -> Spec:
    return _llama_like(source, quantization, show_progress)


def build_mistral_spec(source: ModelSource, quantization: str, show_progress: bool = True) -> Spec:
    return _llama_like(source, quantization, show_progress)


def build_qwen2_spec(source: ModelSource, quantization: str, show_progress: bool = True) -> Spec:
    return _llama_like(source, quantization, show_progress)


def build_qwen3_spec(source: ModelSource, quantization: str, show_progress: bool = True) -> Spec:
    return _llama_like(source, quantization, show_progress, qk_norm=True)


def build_phi_spec(source: ModelSource, quantization: str, show_progress: bool = True) -> Spec:
    """Phi-2: attention and MLP side by side on one LayerNorm (with bias), a plain GELU MLP, biases on every
    projection and the head, partial rotary."""
    config = source.config
    if config.rope_scaling is not None:
        raise ConversionError(f"{source.path}: Phi-2 with rope scaling is not supported")
    spec = Spec.from_config(
        config.num_layers, config.num_heads, activation=ACTIVATIONS[config.activation], pre_norm=True,
        rotary_dim=config.rotary_dim or config.head_dim, rotary_interleave=False, rotary_base=config.rope_theta,
        parallel_residual=True, shared_layer_norm=True,
        num_heads_kv=config.num_kv_heads if config.num_kv_heads != config.num_heads else None,
        head_dim=config.head_dim if config.head_dim * config.num_heads != config.hidden_size else None,
    )
    decoder = spec.decoder
    decoder.scale_embeddings = False
    with progress(config, show_progress) as bar:
        w = Weights(source, quantization, bar)
        decoder.embeddings.weight = w("model.embed_tokens.weight")
        w.finish(decoder.embeddings)
        decoder.layer_norm.gamma = w("model.final_layernorm.weight")
        decoder.layer_norm.beta = w("model.final_layernorm.bias")
        w.finish(decoder.layer_norm)
        decoder.projection.weight = w("lm_head.weight")
        decoder.projection.bias = w("lm_head.bias")
        w.finish(decoder.projection)
        for i, layer in enumerate(decoder.layer):
            p = f"model.layers.{i}."
            attention = layer.self_attention
            layer.shared_layer_norm.gamma = w(p + "input_layernorm.weight")
            layer.shared_layer_norm.beta = w(p + "input_layernorm.bias")
            attention.linear[0].weight = qkv(w, p, "weight")
            attention.linear[0].bias = qkv(w, p, "bias")
            attention.linear[1].weight = w(p + "self_attn.dense.weight")
            attention.linear[1].bias = w(p + "self_attn.dense.bias")
            layer.ffn.linear_0.weight = w(p + "mlp.fc1.weight")
            layer.ffn.linear_0.bias = w(p + "mlp.fc1.bias")
            layer.ffn.linear_1.weight = w(p + "mlp.fc2.weight")
            layer.ffn.linear_1.bias = w(p + "mlp.fc2.bias")
            w.finish(layer)
    return spec


def build_phi3_spec(source: ModelSource, quantization: str, show_progress: bool = True) -> Spec:
    """Phi-3: fused ``qkv_proj`` and ``gate_up_proj``, su/longrope scaling."""
    config = source.config
    spec = from_config(config)
    decoder = spec.decoder
    decoder.scale_embeddings = False
    q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    with progress(config, show_progress) as bar:
        w = Weights(source, quantization, bar)
        embeddings_and_head(decoder, w)
        for i, layer in enumerate(decoder.layer):
            p = f"model.layers.{i}."
            attention = layer.self_attention
            set_frequency_factors(attention, config)
            attention.layer_norm.gamma = w(p + "input_layernorm.weight")
            qkv = w(p + "self_attn.qkv_proj.weight")
            rotary_scale(qkv[:q_rows], config.num_heads, config)  # in place, on views of qkv
            rotary_scale(qkv[q_rows:q_rows + kv_rows], config.num_kv_heads, config)
            attention.linear[0].weight = qkv
            attention.linear[1].weight = w(p + "self_attn.o_proj.weight")
            layer.ffn.layer_norm.gamma = w(p + "post_attention_layernorm.weight")
            gate_up = w(p + "mlp.gate_up_proj.weight")
            half = gate_up.shape[0] // 2
            layer.ffn.linear_0.weight = np.ascontiguousarray(gate_up[:half])
            layer.ffn.linear_0_noact.weight = np.ascontiguousarray(gate_up[half:])
            del gate_up
            layer.ffn.linear_1.weight = w(p + "mlp.down_proj.weight")
            w.finish(layer)
    return spec


SPEC_BUILDERS: dict[str, Callable[..., Spec]] = {
    "llama": build_llama_spec,
    "mistral": build_mistral_spec,
    "qwen2": build_qwen2_spec,
    "qwen3": build_qwen3_spec,
    "phi": build_phi_spec,
    "phi3": build_phi3_spec,
    "gemma": build_gemma_spec,
    "gemma2": build_gemma2_spec,
    "gemma3": build_gemma3_spec,
    "gemma4": build_gemma4_spec,
}


def build_spec(source: ModelSource, vocabulary: Vocabulary, quantization: str, show_progress: bool = True) -> Spec:
    """The CTranslate2 spec of ``source``, its weights already quantized to ``quantization``, ready to save."""
    config = source.config
    if len(vocabulary.tokens) != config.vocab_size:
        raise ConversionError(
            f"{source.path}: the vocabulary has {len(vocabulary.tokens)} tokens but the embeddings have "
            f"{config.vocab_size} rows"
        )
    spec = SPEC_BUILDERS[config.family](source, quantization, show_progress)
    spec.register_vocabulary(vocabulary.tokens)
    fallback = vocabulary.tokens[0]
    spec.config.bos_token = vocabulary.bos or fallback
    spec.config.eos_token = vocabulary.eos or fallback
    spec.config.unk_token = vocabulary.unk or fallback
    spec.config.layer_norm_epsilon = config.rms_norm_eps
    spec.validate()
    if config.tie_word_embeddings:
        # CTranslate2 resolves the alias (and its quantization scale) when loading.
        spec.decoder.projection.weight = TIED_EMBEDDINGS
    return spec
