"""The hyperparameters of a decoder, whichever file they were read from.

Both model sources (a GGUF file, a Hugging Face folder) describe their model
with one :class:`DecoderConfig`, in Hugging Face's terms, so that each
family's spec builder is written once for both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Families the spec builders know, with the names users see in errors and docs.
FAMILIES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "phi": "Phi-2",
    "phi3": "Phi-3",
    "gemma": "Gemma",
    "gemma2": "Gemma 2",
    "gemma3": "Gemma 3",
    "gemma4": "Gemma 4",
}
ROPE_SCALINGS = ("linear", "llama3", "su/longrope")


@dataclass
class RopeScaling:
    """How rotary frequencies are stretched beyond the trained context.

    - ``linear``: positions are divided by ``factor``.
    - ``frequency_factors``: frequency *i* is divided by ``long_factor[i]``
      (Llama 3's scaling, computed from its parameters or read from GGUF's
      ``rope_freqs``).
    - ``longrope`` (Phi-3's su/longrope): as above with ``short_factor`` while the
      sequence fits ``original_context``, ``long_factor`` beyond; cosines and
      sines are multiplied by ``attention_factor``.
    """

    kind: str
    factor: float = 1.0
    long_factor: np.ndarray | None = None
    short_factor: np.ndarray | None = None
    original_context: int = 0
    attention_factor: float = 1.0


@dataclass
class DecoderConfig:
    """A decoder-only transformer in Hugging Face's terms (``config.json`` names where they exist)."""

    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rms_norm_eps: float  # the epsilon of the model's norms (Phi-2: of its LayerNorms)
    rope_theta: float
    rope_scaling: RopeScaling | None = None
    rotary_dim: int | None = None  # None: the whole head (no partial rotary)
    rotary_interleave: bool = False  # Q/K rows in Meta's interleaved rotary layout instead of transformers' halves
    sliding_window: int = 0
    sliding_layers: tuple[bool, ...] | None = None  # None: every layer slides when sliding_window > 0
    local_rope_theta: float | None = None  # rotary base of the sliding layers when it differs (Gemma 3)
    query_pre_attn_scalar: float | None = None  # attention scores are scaled by its -1/2 power (Gemma)
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # Gemma 4's global (full-attention) layers: their own head size and key/value heads, values equal to the keys
    # (attention_k_eq_v), and "proportional" rotary over the first global_rotary_dim / 2 frequencies of the head
    global_head_dim: int | None = None
    global_kv_heads: int | None = None
    global_rotary_dim: int | None = None
    attention_k_eq_v: bool = False
    activation: str = "silu"  # silu, gelu_tanh or gelu
    tie_word_embeddings: bool = False
    name: str | None = None

    @property
    def family_name(self) -> str:
        return FAMILIES.get(self.family, self.family)

    def is_sliding(self, layer: int) -> bool:
        if not self.sliding_window:
            return False
        return True if self.sliding_layers is None else bool(self.sliding_layers[layer])


def llama3_frequency_factors(
    rope_theta: float, dim: int, factor: float, low_freq_factor: float, high_freq_factor: float,
    original_context: int,
) -> np.ndarray:
    """Llama 3.1's rope scaling as one divisor per rotary frequency (what llama.cpp stores as ``rope_freqs``)."""
    inv_freq = 1.0 / (rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_context / low_freq_factor
    high_freq_wavelen = original_context / high_freq_factor
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    medium = 1.0 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelen < high_freq_wavelen, 1.0, np.where(wavelen > low_freq_wavelen, factor, medium))
    return factors.astype(np.float32)


def longrope_attention_factor(stretch: float, original_context: int) -> float:
    """Phi-3's default cos/sin scale, ``sqrt(1 + ln(stretch) / ln(original_context))``."""
    if stretch <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(stretch) / math.log(original_context))
