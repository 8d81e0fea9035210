"""What the family spec builders share: reading and quantizing weights part by part, the spec's options from a
:class:`DecoderConfig`, rotary scaling, fused Q/K/V, embeddings and head."""

from __future__ import annotations

import numpy as np
from ctranslate2.specs import attention_spec, common_spec, transformer_spec
from tqdm import tqdm

from .model_config import DecoderConfig
from .source import ModelSource

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


class Weights:
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


def from_config(config: DecoderConfig, **options) -> Spec:
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


def set_frequency_factors(attention, config: DecoderConfig) -> None:
    scaling = config.rope_scaling
    if scaling is not None and scaling.kind in ("frequency_factors", "longrope"):
        attention.rotary_scaling_long_factor = np.asarray(scaling.long_factor, dtype=np.float32)
        attention.rotary_scaling_short_factor = np.asarray(scaling.short_factor, dtype=np.float32)


def rotary_scale(weight: np.ndarray, num_heads: int, config: DecoderConfig) -> np.ndarray:
    """Scale the rotary rows of a Q or K projection by longrope's attention factor."""
    scaling = config.rope_scaling
    if scaling is None or scaling.kind != "longrope" or scaling.attention_factor == 1.0:
        return weight
    rotary_dim = config.rotary_dim or config.head_dim
    heads = weight.reshape(num_heads, config.head_dim, *weight.shape[1:])
    heads[:, :rotary_dim] *= np.float32(scaling.attention_factor)
    return heads.reshape(weight.shape)


def qkv(w: Weights, prefix: str, suffix: str) -> np.ndarray:
    config = w.config
    q = rotary_scale(w(f"{prefix}self_attn.q_proj.{suffix}"), config.num_heads, config)
    k = rotary_scale(w(f"{prefix}self_attn.k_proj.{suffix}"), config.num_kv_heads, config)
    return np.concatenate([q, k, w(f"{prefix}self_attn.v_proj.{suffix}")], axis=0)


def embeddings_and_head(decoder, w: Weights, gemma_norm: bool = False) -> None:
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


def progress(config: DecoderConfig, enabled: bool) -> tqdm:
    """One step per layer, plus the embeddings, the final norm and an untied head."""
    total = config.num_layers + (2 if config.tie_word_embeddings else 3)
    return tqdm(total=total, desc="converting", unit="part", disable=not enabled, leave=False)


def gated_mlp(ffn, w: Weights, prefix: str) -> None:
    """A gated MLP's three projections (SwiGLU, GeGLU) into the layer's feed-forward spec."""
    ffn.linear_0.weight = w(prefix + "mlp.gate_proj.weight")
    ffn.linear_0_noact.weight = w(prefix + "mlp.up_proj.weight")
    ffn.linear_1.weight = w(prefix + "mlp.down_proj.weight")
