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

Weights are quantized layer by layer as they are read, so a float32 copy of
the whole model never exists at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from ctranslate2.specs import attention_spec, common_spec, transformer_spec
from tqdm import tqdm

from ..errors import ConversionError
from .model_config import DecoderConfig
from .source import ModelSource, Vocabulary

log = logging.getLogger(__name__)

Spec = transformer_spec.TransformerDecoderModelSpec
SCALING_TYPES = {
    "linear": attention_spec.RotaryScalingType.Linear,
    "frequency_factors": attention_spec.RotaryScalingType.Su,
    "longrope": attention_spec.RotaryScalingType.Su,
}
TIED_EMBEDDINGS = "decoder/embeddings/weight"
ACTIVATIONS = {
    "silu": common_spec.Activation.SWISH,
    "gelu_tanh": common_spec.Activation.GELUTanh,
    "gelu": common_spec.Activation.GELU,
}


class _Weights:
    """Reads tensors for a builder and quantizes each finished part of the spec at once."""

    def __init__(self, source: ModelSource, quantization: str, bar: tqdm):
        self.source = source
        self.config = source.config
        self.quantization = quantization
        self.bar = bar

    def __call__(self, name: str) -> np.ndarray:
        return self.source.tensor(name)

    def has(self, name: str) -> bool:
        return self.source.has_tensor(name)

    def finish(self, part) -> None:
        """Validate and quantize ``part`` (a layer, the embeddings...), dropping its float32 arrays."""
        part.validate()
        part._quantize(self.quantization)
        self.bar.update(1)


def _from_config(config: DecoderConfig, **options) -> Spec:
    scaling = config.rope_scaling
    rotary = {}
    if scaling is not None:
        rotary["rotary_scaling_type"] = SCALING_TYPES[scaling.kind]
        if scaling.kind == "linear":
            rotary["rotary_scaling_factor"] = scaling.factor
        if scaling.kind == "longrope":
            rotary["original_max_position_embeddings"] = scaling.original_context
    return Spec.from_config(
        config.num_layers,
        config.num_heads,
        activation=ACTIVATIONS[config.activation],
        pre_norm=True,
        ffn_glu=True,
        rms_norm=True,
        rotary_dim=config.rotary_dim or 0,
        rotary_interleave=config.rotary_interleave,
        rotary_base=config.rope_theta,
        num_heads_kv=config.num_kv_heads if config.num_kv_heads != config.num_heads else None,
        head_dim=config.head_dim if config.head_dim * config.num_heads != config.hidden_size else None,
        sliding_window=config.sliding_window or None,
        **rotary,
        **options,
    )


def _set_frequency_factors(attention, config: DecoderConfig) -> None:
    scaling = config.rope_scaling
    if scaling is not None and scaling.kind in ("frequency_factors", "longrope"):
        attention.rotary_scaling_long_factor = np.asarray(scaling.long_factor, dtype=np.float32)
        attention.rotary_scaling_short_factor = np.asarray(scaling.short_factor, dtype=np.float32)


def _rotary_scale(weight: np.ndarray, num_heads: int, config: DecoderConfig) -> np.ndarray:
    """Scale the rotary rows of a Q or K projection by longrope's attention factor."""
    scaling = config.rope_scaling
    if scaling is None or scaling.kind != "longrope" or scaling.attention_factor == 1.0:
        return weight
    rotary_dim = config.rotary_dim or config.head_dim
    heads = weight.reshape(num_heads, config.head_dim, *weight.shape[1:])
    heads[:, :rotary_dim] *= np.float32(scaling.attention_factor)
    return heads.reshape(weight.shape)


def _qkv(w: _Weights, prefix: str, suffix: str) -> np.ndarray:
    config = w.config
    q = _rotary_scale(w(f"{prefix}self_attn.q_proj.{suffix}"), config.num_heads, config)
    k = _rotary_scale(w(f"{prefix}self_attn.k_proj.{suffix}"), config.num_kv_heads, config)
    return np.concatenate([q, k, w(f"{prefix}self_attn.v_proj.{suffix}")], axis=0)


def _embeddings_and_head(decoder, w: _Weights, gemma_norm: bool = False) -> None:
    embeddings = w("model.embed_tokens.weight")
    decoder.embeddings.weight = embeddings
    w.finish(decoder.embeddings)
    decoder.layer_norm.gamma = w("model.norm.weight")
    if gemma_norm:
        decoder.layer_norm.layer_norm_use_residual = True
    w.finish(decoder.layer_norm)
    if not w.config.tie_word_embeddings:
        decoder.projection.weight = w("lm_head.weight")
        w.finish(decoder.projection)
    else:  # tied: made an alias of the embeddings once the spec is complete (see build_spec)
        decoder.projection.weight = decoder.embeddings.weight


def _progress(config: DecoderConfig, enabled: bool) -> tqdm:
    """One step per layer, plus the embeddings, the final norm and an untied head."""
    total = config.num_layers + (2 if config.tie_word_embeddings else 3)
    return tqdm(total=total, desc="converting", unit="part", disable=not enabled, leave=False)


def _llama_like(source: ModelSource, quantization: str, show_progress: bool, qk_norm: bool = False,
                gemma: bool = False) -> Spec:
    """Llama, Mistral, Qwen2 (Q/K/V biases), Qwen3 (Q/K norms): pre-norm, SwiGLU, GQA; Gemma (1): the same
    with GELU-tanh, embeddings scaled by the square root of their width and (1 + weight) norms."""
    config = source.config
    spec = _from_config(config, qk_norm=qk_norm)
    decoder = spec.decoder
    decoder.scale_embeddings = gemma
    if gemma:
        decoder.start_from_zero_embedding = False
    with _progress(config, show_progress) as bar:
        w = _Weights(source, quantization, bar)
        _embeddings_and_head(decoder, w, gemma_norm=gemma)
        for i, layer in enumerate(decoder.layer):
            p = f"model.layers.{i}."
            attention = layer.self_attention
            _set_frequency_factors(attention, config)
            attention.layer_norm.gamma = w(p + "input_layernorm.weight")
            attention.linear[0].weight = _qkv(w, p, "weight")
            if w.has(p + "self_attn.q_proj.bias"):
                attention.linear[0].bias = _qkv(w, p, "bias")
            attention.linear[1].weight = w(p + "self_attn.o_proj.weight")
            if qk_norm:
                attention.q_norm.gamma = w(p + "self_attn.q_norm.weight")
                attention.k_norm.gamma = w(p + "self_attn.k_norm.weight")
            layer.ffn.layer_norm.gamma = w(p + "post_attention_layernorm.weight")
            if gemma:
                attention.layer_norm.layer_norm_use_residual = True
                layer.ffn.layer_norm.layer_norm_use_residual = True
            layer.ffn.linear_0.weight = w(p + "mlp.gate_proj.weight")
            layer.ffn.linear_0_noact.weight = w(p + "mlp.up_proj.weight")
            layer.ffn.linear_1.weight = w(p + "mlp.down_proj.weight")
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
    with _progress(config, show_progress) as bar:
        w = _Weights(source, quantization, bar)
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
            attention.linear[0].weight = _qkv(w, p, "weight")
            attention.linear[0].bias = _qkv(w, p, "bias")
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
    spec = _from_config(config)
    decoder = spec.decoder
    decoder.scale_embeddings = False
    q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    with _progress(config, show_progress) as bar:
        w = _Weights(source, quantization, bar)
        _embeddings_and_head(decoder, w)
        for i, layer in enumerate(decoder.layer):
            p = f"model.layers.{i}."
            attention = layer.self_attention
            _set_frequency_factors(attention, config)
            attention.layer_norm.gamma = w(p + "input_layernorm.weight")
            qkv = w(p + "self_attn.qkv_proj.weight")
            _rotary_scale(qkv[:q_rows], config.num_heads, config)  # in place, on views of qkv
            _rotary_scale(qkv[q_rows:q_rows + kv_rows], config.num_kv_heads, config)
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


def _gemma(source: ModelSource, quantization: str, show_progress: bool, qk_norm: bool) -> Spec:
    """Gemma 2 and 3: scaled embeddings, (1 + weight) norms before and after each block,
    sliding-window layers, GELU-tanh; Gemma 2 soft-caps the logits, Gemma 3 norms Q and K."""
    config = source.config
    spec = _from_config(config, pre_post_layer_norm=True, qk_norm=qk_norm)
    decoder = spec.decoder
    decoder.scale_embeddings = True
    decoder.start_from_zero_embedding = False
    if config.final_logit_softcapping:
        decoder.final_logit_softcapping = np.float32(config.final_logit_softcapping)
    queries_scale = None
    if config.query_pre_attn_scalar and config.query_pre_attn_scalar != config.head_dim:
        queries_scale = np.float32(config.query_pre_attn_scalar ** -0.5)
    with _progress(config, show_progress) as bar:
        w = _Weights(source, quantization, bar)
        _embeddings_and_head(decoder, w, gemma_norm=True)
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
            attention.linear[0].weight = _qkv(w, p, "weight")
            attention.linear[1].weight = w(p + "self_attn.o_proj.weight")
            layer.ffn.linear_0.weight = w(p + "mlp.gate_proj.weight")
            layer.ffn.linear_0_noact.weight = w(p + "mlp.up_proj.weight")
            layer.ffn.linear_1.weight = w(p + "mlp.down_proj.weight")
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
    with _progress(config, show_progress) as bar:
        w = _Weights(source, quantization, bar)
        _embeddings_and_head(decoder, w)
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
            layer.ffn.linear_0.weight = w(p + "mlp.gate_proj.weight")
            layer.ffn.linear_0_noact.weight = w(p + "mlp.up_proj.weight")
            layer.ffn.linear_1.weight = w(p + "mlp.down_proj.weight")
            if w.has(p + "layer_scalar"):
                layer.layer_scalar = np.float32(w(p + "layer_scalar").reshape(-1)[0])
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
