"""A GGUF file seen as a Hugging Face model: llama.cpp's converter run in reverse.

What ``convert_hf_to_gguf.py`` does and this undoes, per architecture:

- tensor names: ``model.layers.N.self_attn.q_proj.weight`` → ``blk.N.attn_q.weight``
  and so on (:data:`LAYER_TENSORS`); Gemma's post-attention norm is
  ``post_attention_norm``, its pre-FFN norm ``ffn_norm``; Phi-3's fused
  ``gate_up_proj`` is stored as ``ffn_up``.
- ``llama`` (Mistral is written as ``llama`` too): the Q and K rows are
  permuted into Meta's interleaved rotary layout. They are used as stored,
  with interleaved rotary embeddings (``DecoderConfig.rotary_interleave``):
  the same model in float32, and the very same int8 model as before this
  reader existed, whereas permuting back changes int8 rounding enough to flip
  a small model's greedy answers (measured: SmolLM2-135M int8 stops naming
  Paris as the capital of France).
- ``gemma``/``gemma2``/``gemma3``: every ``*norm.weight`` has Gemma's ``+1`` folded in;
  it is taken out again, so Gemma norms mean the same from either source.
- Llama 3 rope scaling becomes a ``rope_freqs`` tensor (a divisor per
  frequency); Phi-3's su/longrope becomes ``rope_factors_long``/``_short``
  tensors plus ``rope.scaling.attn_factor``; linear scaling stays metadata.
- Facts the file does not carry are llama.cpp's own constants, taken over:
  Gemma 2 slides on every second layer, Gemma 3 on five of every six
  (unless ``attention.sliding_window_pattern`` says otherwise), Gemma 3's
  sliding layers use rotary base 10000, and the 27B Gemmas scale attention
  by ``hidden / heads`` instead of the head size.
"""

from __future__ import annotations

import os
import re

import numpy as np

from ..errors import ConversionError
from .gguf_file import GGUFFile, open_gguf
from .gguf_tokenizer import write_tokenizer_files
from .model_config import DecoderConfig, RopeScaling
from .source import ModelSource, Vocabulary

ARCHITECTURE_FAMILIES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi2": "phi",
    "phi3": "phi3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "gemma4": "gemma4",
}

GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# Hugging Face name inside model.layers.N -> GGUF name inside blk.N.
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight",
}
# Phi-2: LayerNorms with biases, biases everywhere, a plain (not gated) MLP.
PHI2_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.final_layernorm.weight": "output_norm.weight",
    "model.final_layernorm.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
    "lm_head.bias": "output.bias",
}
PHI2_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "input_layernorm.bias": "attn_norm.bias",
    **{f"self_attn.{n}_proj.{p}": f"attn_{n}.{p}" for n in "qkv" for p in ("weight", "bias")},
    "self_attn.dense.weight": "attn_output.weight",
    "self_attn.dense.bias": "attn_output.bias",
    "mlp.fc1.weight": "ffn_up.weight",
    "mlp.fc1.bias": "ffn_up.bias",
    "mlp.fc2.weight": "ffn_down.weight",
    "mlp.fc2.bias": "ffn_down.bias",
}
GEMMA_LAYER_TENSORS = {
    **LAYER_TENSORS,
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
GEMMA4_LAYER_TENSORS = {**GEMMA_LAYER_TENSORS, "layer_scalar": "layer_output_scale.weight"}
GEMMA_SLIDING_PATTERN = {"gemma2": 2, "gemma3": 6}
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
GEMMA3_LOCAL_ROPE_BASE = 10000.0

_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")


class GGUFSource(ModelSource):
    """A ``.gguf`` file of a supported architecture."""

    format = "gguf"

    def __init__(self, gguf: GGUFFile):
        self.gguf = gguf
        self.path = gguf.path
        self.architecture = gguf.architecture
        self.config = self._read_config()
        self._layer_tensors = {"gemma2": GEMMA_LAYER_TENSORS, "gemma3": GEMMA_LAYER_TENSORS,
                               "gemma4": GEMMA4_LAYER_TENSORS, "phi2": PHI2_LAYER_TENSORS}.get(self.architecture, LAYER_TENSORS)
        self._global_tensors = PHI2_GLOBAL_TENSORS if self.architecture == "phi2" else GLOBAL_TENSORS
        self._norms_hold_one = self.architecture in ("gemma", "gemma2", "gemma3")  # Gemma 4's norms are plain

    @classmethod
    def open(cls, path: str | os.PathLike) -> GGUFSource:
        gguf = open_gguf(path)
        if gguf.architecture not in ARCHITECTURE_FAMILIES:
            raise ConversionError(
                f"{gguf.path}: unsupported architecture {gguf.architecture!r}; "
                f"supported: {', '.join(ARCHITECTURE_FAMILIES)}"
            )
        return cls(gguf)

    # Hyperparameters ---------------------------------------------------------
    def _int(self, key: str, default: int | None = None) -> int | None:
        value = self.gguf.arch_field(key, default)
        if isinstance(value, list):  # per-layer arrays: supported families use one value
            if len(set(value)) != 1:
                raise ConversionError(f"{self.path}: per-layer {key} values {sorted(set(value))} are not supported")
            value = value[0]
        return None if value is None else int(value)

    def _read_config(self) -> DecoderConfig:
        arch = self.architecture
        family = ARCHITECTURE_FAMILIES[arch]
        if arch == "gemma4":
            return self._read_gemma4()
        num_layers = self._int("block_count")
        hidden = self._int("embedding_length")
        num_heads = self._int("attention.head_count")
        if not (num_layers and hidden and num_heads):
            raise ConversionError(f"{self.path}: block_count, embedding_length or attention.head_count is missing")
        head_dim = self._int("attention.key_length", hidden // num_heads)
        rotary_dim = self._int("rope.dimension_count", head_dim)
        vocab_size, embed_width = self.gguf.tensor_shape("token_embd.weight")
        config = DecoderConfig(
            family=family,
            num_layers=num_layers,
            hidden_size=hidden,
            num_heads=num_heads,
            num_kv_heads=self._int("attention.head_count_kv", num_heads),
            head_dim=head_dim,
            vocab_size=vocab_size,
            context_length=self._int("context_length", 2048),
            rms_norm_eps=float(self.gguf.arch_field("attention.layer_norm_epsilon" if arch == "phi2" else
                                                    "attention.layer_norm_rms_epsilon",
                                                    1e-6 if arch.startswith("gemma") else 1e-5)),
            rope_theta=float(self.gguf.arch_field("rope.freq_base", 10000.0)),
            rope_scaling=self._rope_scaling(family),
            rotary_dim=rotary_dim if rotary_dim != head_dim else None,
            rotary_interleave=arch == "llama",
            activation="gelu_tanh" if arch.startswith(("gemma", "phi2")) else "silu",
            tie_word_embeddings=not self.gguf.has_tensor("output.weight"),
            name=self.gguf.field("general.name"),
        )
        if embed_width != hidden:
            raise ConversionError(f"{self.path}: token_embd.weight is {embed_width} wide, embedding_length is {hidden}")
        if arch in GEMMA_SLIDING_PATTERN:
            self._read_gemma(config)
        return config

    def _rope_scaling(self, family: str) -> RopeScaling | None:
        gguf = self.gguf
        kind = gguf.arch_field("rope.scaling.type")
        if gguf.has_tensor("rope_freqs.weight"):
            factors = gguf.tensor("rope_freqs.weight").reshape(-1)
            return RopeScaling("frequency_factors", long_factor=factors, short_factor=factors)
        if gguf.has_tensor("rope_factors_long.weight"):
            return RopeScaling(
                "longrope",
                long_factor=gguf.tensor("rope_factors_long.weight").reshape(-1),
                short_factor=gguf.tensor("rope_factors_short.weight").reshape(-1),
                original_context=self._int("rope.scaling.original_context_length", 0),
                attention_factor=float(gguf.arch_field("rope.scaling.attn_factor", 1.0)),
            )
        if kind == "linear":
            factor = gguf.arch_field("rope.scaling.factor") or gguf.arch_field("rope.scale_linear")
            return RopeScaling("linear", factor=float(factor)) if factor and float(factor) != 1.0 else None
        if kind in (None, "none"):
            return None
        raise ConversionError(
            f"{self.path}: {family} rope scaling {kind!r} is not supported by CTranslate2; "
            "supported: linear, llama3 (rope_freqs), su/longrope"
        )

    def _read_gemma(self, config: DecoderConfig) -> None:
        arch = self.architecture
        field = self.gguf.arch_field
        window = field("attention.sliding_window", 4096 if arch == "gemma2" else 0)
        config.sliding_window = int(window or 0)
        pattern = field("attention.sliding_window_pattern", GEMMA_SLIDING_PATTERN[arch])
        if isinstance(pattern, list):
            config.sliding_layers = tuple(bool(p) for p in pattern)
        else:  # llama.cpp's set_swa_pattern: the last layer of every group of n is global
            n = int(pattern)
            config.sliding_layers = tuple(n == 0 or i % n < n - 1 for i in range(config.num_layers))
        if arch == "gemma3":
            config.local_rope_theta = float(field("rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE))
            config.final_logit_softcapping = float(field("final_logit_softcapping", 0.0)) or None
        else:
            config.attn_logit_softcapping = float(field("attn_logit_softcapping", 50.0)) or None
            config.final_logit_softcapping = float(field("final_logit_softcapping", 30.0)) or None
        large = config.num_layers == GEMMA_27B_LAYERS[arch]
        config.query_pre_attn_scalar = float(config.hidden_size // config.num_heads if large else config.head_dim)

    def _read_gemma4(self) -> DecoderConfig:
        """Gemma 4 as llama.cpp's Gemma4Model writes it: per-layer key/value head counts and sliding pattern, the
        global layers' head size as key_length (the sliding ones' as key_length_swa), their proportional rotary as a
        ``rope_freqs`` tensor of 1 for each rotated frequency and 1e30 for the others, no v projection where values
        are the keys, plain (not 1 + weight) norms."""
        field = self.gguf.arch_field
        for key, what in (("attention.shared_kv_layers", "key/value states shared between layers (E2B, E4B)"),
                          ("embedding_length_per_layer_input", "per-layer input embeddings (E2B, E4B)"),
                          ("expert_count", "mixture-of-experts blocks (26B-A4B)")):
            if field(key):
                raise ConversionError(f"{self.path}: Gemma 4 with {what} cannot run in CTranslate2 4.8; "
                                      "the dense Gemma 4 models (31B) can")
        num_layers, hidden, num_heads = (self._int(k) for k in ("block_count", "embedding_length", "attention.head_count"))
        pattern = field("attention.sliding_window_pattern")
        sliding = tuple(bool(p) for p in pattern) if isinstance(pattern, list) else tuple(
            (i + 1) % 6 != 0 and i < num_layers - 1 for i in range(num_layers))
        first_global = sliding.index(False)
        kv = field("attention.head_count_kv", num_heads)
        kv = kv if isinstance(kv, list) else [kv] * num_layers
        local_kv = int(kv[sliding.index(True)]) if any(sliding) else int(kv[0])
        global_dim = self._int("attention.key_length")
        head_dim = self._int("attention.key_length_swa", global_dim)
        global_rotary = global_dim
        if self.gguf.has_tensor("rope_freqs.weight"):
            factors = self.gguf.tensor("rope_freqs.weight").reshape(-1)
            global_rotary = 2 * int((factors < 1e10).sum())
        vocab_size, _ = self.gguf.tensor_shape("token_embd.weight")
        return DecoderConfig(
            family="gemma4", num_layers=num_layers, hidden_size=hidden, num_heads=num_heads, num_kv_heads=local_kv,
            head_dim=head_dim, vocab_size=vocab_size, context_length=self._int("context_length", 131072),
            rms_norm_eps=float(field("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(field("rope.freq_base", 1_000_000.0)),
            local_rope_theta=float(field("rope.freq_base_swa", 10_000.0)),
            sliding_window=int(field("attention.sliding_window", 512)), sliding_layers=sliding,
            query_pre_attn_scalar=1.0,
            final_logit_softcapping=float(field("final_logit_softcapping", 0.0)) or None,
            global_head_dim=global_dim, global_kv_heads=int(kv[first_global]), global_rotary_dim=global_rotary,
            attention_k_eq_v=not self.gguf.has_tensor(f"blk.{first_global}.attn_v.weight"),
            activation="gelu_tanh", tie_word_embeddings=not self.gguf.has_tensor("output.weight"),
            name=self.gguf.field("general.name"),
        )

    # Tensors -----------------------------------------------------------------
    def _gguf_name(self, name: str) -> str | None:
        if name in self._global_tensors:
            return self._global_tensors[name]
        match = _LAYER_NAME.fullmatch(name)
        if match and match.group(2) in self._layer_tensors:
            return f"blk.{match.group(1)}.{self._layer_tensors[match.group(2)]}"
        return None

    def has_tensor(self, name: str) -> bool:
        gguf_name = self._gguf_name(name)
        return gguf_name is not None and self.gguf.has_tensor(gguf_name)

    def tensor(self, name: str) -> np.ndarray:
        gguf_name = self._gguf_name(name)
        if gguf_name is None:
            raise ConversionError(f"{self.path}: no GGUF tensor corresponds to {name!r}")
        data = self.gguf.tensor(gguf_name)
        if self._norms_hold_one and name.endswith("norm.weight"):
            data = data - 1.0
        return data

    # Tokenizer ---------------------------------------------------------------
    def write_tokenizer_files(self, out_dir: str) -> Vocabulary:
        return write_tokenizer_files(self.gguf, out_dir, self.config.context_length, self.config.vocab_size)
