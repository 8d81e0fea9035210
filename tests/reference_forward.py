"""Independent numpy forward passes: over dequantized GGUF weights, and over Hugging Face tensors.

Written from the architectures' published math (llama.cpp's graphs), not from
the converter: it reads the GGUF itself, applies rotary embeddings in each
architecture's own layout, and computes in float64. The converted CTranslate2
model must reproduce its logits.
"""

from __future__ import annotations

import math

import gguf
import numpy as np
from gguf.quants import dequantize


class GGUFWeights:
    def __init__(self, path: str):
        self.reader = gguf.GGUFReader(path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = self.reader.fields["general.architecture"].contents()

    def meta(self, key, default=None):
        field = self.reader.fields.get(f"{self.arch}.{key}")
        return field.contents() if field is not None else default

    def __call__(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        data = dequantize(t.data, t.tensor_type)
        return np.asarray(data, dtype=np.float64).reshape(tuple(int(d) for d in reversed(t.shape)))

    def has(self, name: str) -> bool:
        return name in self.tensors


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope_interleaved(x: np.ndarray, base: float) -> np.ndarray:
    """Meta layout: rotate pairs (0,1), (2,3), ... — x is (T, H, D)."""
    T, _, D = x.shape
    inv = base ** (-np.arange(0, D, 2) / D)
    ang = np.arange(T)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


def rope_halves(x: np.ndarray, base: float) -> np.ndarray:
    """NeoX layout: rotate (i, i + D/2)."""
    T, _, D = x.shape
    half = D // 2
    inv = base ** (-np.arange(0, half) * 2 / D)
    ang = np.arange(T)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def attention(q, k, v, window: int | None) -> np.ndarray:
    """Causal grouped-query attention. q (T, H, D), k/v (T, Hkv, D) → (T, H*D)."""
    T, H, D = q.shape
    group = H // k.shape[1]
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) / math.sqrt(D)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    mask = j > i
    if window:
        mask |= (i - j) >= window
    scores = np.where(mask[None], -np.inf, scores)
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, v).reshape(T, H * D)


def silu(x):
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def llama_logits(w: GGUFWeights, ids: list[int]) -> np.ndarray:
    n_layers, n_heads = w.meta("block_count"), w.meta("attention.head_count")
    n_kv, eps, base = w.meta("attention.head_count_kv"), w.meta("attention.layer_norm_rms_epsilon"), w.meta("rope.freq_base")
    emb = w("token_embd.weight")
    x = emb[ids]
    T, hidden = x.shape
    D = hidden // n_heads
    for i in range(n_layers):
        p = f"blk.{i}"
        h = rms_norm(x, w(f"{p}.attn_norm.weight"), eps)
        q = (h @ w(f"{p}.attn_q.weight").T).reshape(T, n_heads, D)
        k = (h @ w(f"{p}.attn_k.weight").T).reshape(T, n_kv, D)
        v = (h @ w(f"{p}.attn_v.weight").T).reshape(T, n_kv, D)
        x = x + attention(rope_interleaved(q, base), rope_interleaved(k, base), v, None) @ w(f"{p}.attn_output.weight").T
        h = rms_norm(x, w(f"{p}.ffn_norm.weight"), eps)
        x = x + (silu(h @ w(f"{p}.ffn_gate.weight").T) * (h @ w(f"{p}.ffn_up.weight").T)) @ w(f"{p}.ffn_down.weight").T
    x = rms_norm(x, w("output_norm.weight"), eps)
    out = w("output.weight") if w.has("output.weight") else emb
    return x @ out.T


def gemma3_logits(w: GGUFWeights, ids: list[int]) -> np.ndarray:
    """Gemma 3: GGUF norm weights already include Gemma's +1 (llama.cpp folds it in)."""
    n_layers, n_heads = w.meta("block_count"), w.meta("attention.head_count")
    n_kv, eps = w.meta("attention.head_count_kv"), w.meta("attention.layer_norm_rms_epsilon")
    D, window, global_base = w.meta("attention.key_length"), w.meta("attention.sliding_window"), w.meta("rope.freq_base")
    emb = w("token_embd.weight")
    x = emb[ids] * math.sqrt(emb.shape[1])
    T = x.shape[0]
    for i in range(n_layers):
        p = f"blk.{i}"
        is_global = (i + 1) % 6 == 0
        base = global_base if is_global else 10000.0
        h = rms_norm(x, w(f"{p}.attn_norm.weight"), eps)
        q = rms_norm((h @ w(f"{p}.attn_q.weight").T).reshape(T, n_heads, D), w(f"{p}.attn_q_norm.weight"), eps)
        k = rms_norm((h @ w(f"{p}.attn_k.weight").T).reshape(T, n_kv, D), w(f"{p}.attn_k_norm.weight"), eps)
        v = (h @ w(f"{p}.attn_v.weight").T).reshape(T, n_kv, D)
        a = attention(rope_halves(q, base), rope_halves(k, base), v, None if is_global else window)
        x = x + rms_norm(a @ w(f"{p}.attn_output.weight").T, w(f"{p}.post_attention_norm.weight"), eps)
        h = rms_norm(x, w(f"{p}.ffn_norm.weight"), eps)
        f = (gelu_tanh(h @ w(f"{p}.ffn_gate.weight").T) * (h @ w(f"{p}.ffn_up.weight").T)) @ w(f"{p}.ffn_down.weight").T
        x = x + rms_norm(f, w(f"{p}.post_ffw_norm.weight"), eps)
    x = rms_norm(x, w("output_norm.weight"), eps)
    return x @ emb.T


def reference_logits(gguf_path: str, ids: list[int]) -> np.ndarray:
    w = GGUFWeights(gguf_path)
    return {"llama": llama_logits, "gemma3": gemma3_logits}[w.arch](w, ids)


# Hugging Face models ----------------------------------------------------------
#
# The same math for a model given as Hugging Face holds it: config.json as a
# dict and the tensors under their Hugging Face names. Written from
# transformers' modeling files (and its rope_utils), in float64, reading
# nothing the converter produces.

HF_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "phi3": "phi3",
               "gemma": "gemma", "gemma2": "gemma", "gemma3_text": "gemma", "gemma3": "gemma"}


def _inv_freq(theta: float, dim: int, rope: dict | None, config: dict, seq_len: int) -> tuple[np.ndarray, float]:
    """transformers' ROPE_INIT_FUNCTIONS: (inverse frequencies, cos/sin scale)."""
    exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
    inv = 1.0 / theta ** exponents
    kind = (rope or {}).get("rope_type") or (rope or {}).get("type") or "default"
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / rope["factor"], 1.0
    if kind == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return np.where(medium, smoothed, scaled), 1.0
    if kind in ("longrope", "su"):
        original = config.get("original_max_position_embeddings")
        if original:
            factor = config["max_position_embeddings"] / original
        else:
            original, factor = config["max_position_embeddings"], rope.get("factor", 1.0)
        scale = rope.get("attention_factor")
        if scale is None:
            scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        ext = np.asarray(rope["long_factor"] if seq_len > original else rope["short_factor"], dtype=np.float64)
        return 1.0 / (ext * theta ** exponents), scale
    raise ValueError(f"rope type {kind}")


def rope_partial_halves(x: np.ndarray, inv: np.ndarray, scale: float) -> np.ndarray:
    """Hugging Face's rotate_half layout on the first 2 * len(inv) dims of each head; x is (T, H, D)."""
    T = x.shape[0]
    rot = 2 * len(inv)
    ang = np.arange(T)[:, None] * inv[None, :]
    ang = np.concatenate([ang, ang], axis=-1)
    cos, sin = (np.cos(ang) * scale)[:, None, :], (np.sin(ang) * scale)[:, None, :]
    part, rest = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = np.concatenate([-part[..., half:], part[..., :half]], axis=-1)
    return np.concatenate([part * cos + rotated * sin, rest], axis=-1)


def _hf_attention(q, k, v, scaling: float, window: int | None, softcap: float | None) -> np.ndarray:
    T, H, D = q.shape
    group = H // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) * scaling
    if softcap:
        scores = np.tanh(scores / softcap) * softcap
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    mask = j > i
    if window:
        mask |= (i - j) >= window
    scores = np.where(mask[None], -np.inf, scores)
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, v).reshape(T, -1)


def _sliding_layers(config: dict, kind: str, n_layers: int) -> list[bool]:
    window = config.get("sliding_window")
    if config.get("layer_types"):
        return [t == "sliding_attention" for t in config["layer_types"]]
    if config["model_type"] == "gemma2":
        return [i % 2 == 0 for i in range(n_layers)]
    if config["model_type"].startswith("gemma3"):
        pattern = config.get("sliding_window_pattern", 6)
        return [(i + 1) % pattern != 0 for i in range(n_layers)]
    return [bool(window) and config["model_type"] == "mistral"] * n_layers


def hf_reference_logits(config: dict, weights: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """Logits of every position for a Llama/Mistral/Qwen2/Qwen3/Phi-3/Gemma/Gemma 2/Gemma 3 model."""
    kind = HF_FAMILIES[config["model_type"]]
    gemma = kind == "gemma"
    w = {name: np.asarray(t, dtype=np.float64) for name, t in weights.items()}
    n_layers, n_heads = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_heads)
    hidden = config["hidden_size"]
    D = config.get("head_dim") or hidden // n_heads
    eps = config["rms_norm_eps"]
    rot_dim = int(D * config.get("partial_rotary_factor", 1.0))
    T = len(ids)

    def norm(x, weight):
        return rms_norm(x, 1.0 + weight if gemma else weight, eps)

    def act(x):
        return gelu_tanh(x) if gemma else silu(x)

    global_rope = _inv_freq(config.get("rope_theta", 10000.0), rot_dim, config.get("rope_scaling"), config, T)
    local_rope = (_inv_freq(config["rope_local_base_freq"], rot_dim, None, config, T)
                  if "rope_local_base_freq" in config else global_rope)
    sliding = _sliding_layers(config, kind, n_layers)
    scaling = ((config.get("query_pre_attn_scalar") if gemma else None) or D) ** -0.5
    sandwich = gemma and config["model_type"] != "gemma"  # Gemma 2 and 3 norm each block's output too

    x = w["model.embed_tokens.weight"][ids]
    if gemma:
        x = x * math.sqrt(hidden)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        if kind == "phi3":
            qkv = h @ w[p + "self_attn.qkv_proj.weight"].T
            q, k, v = np.split(qkv, [n_heads * D, (n_heads + n_kv) * D], axis=-1)
        else:
            q, k, v = (h @ w[f"{p}self_attn.{n}_proj.weight"].T for n in "qkv")
            if p + "self_attn.q_proj.bias" in w:
                q, k, v = (t + w[f"{p}self_attn.{n}_proj.bias"] for t, n in zip((q, k, v), "qkv", strict=True))
        q, k, v = q.reshape(T, n_heads, D), k.reshape(T, n_kv, D), v.reshape(T, n_kv, D)
        if p + "self_attn.q_norm.weight" in w:
            q, k = norm(q, w[p + "self_attn.q_norm.weight"]), norm(k, w[p + "self_attn.k_norm.weight"])
        inv, scale = local_rope if sliding[i] else global_rope
        q, k = rope_partial_halves(q, inv, scale), rope_partial_halves(k, inv, scale)
        window = config.get("sliding_window") if sliding[i] else None
        a = _hf_attention(q, k, v, scaling, window, config.get("attn_logit_softcapping")) @ w[p + "self_attn.o_proj.weight"].T
        if sandwich:
            x = x + norm(a, w[p + "post_attention_layernorm.weight"])
            h = norm(x, w[p + "pre_feedforward_layernorm.weight"])
        else:
            x = x + a
            h = norm(x, w[p + "post_attention_layernorm.weight"])
        if kind == "phi3":
            gate, up = np.split(h @ w[p + "mlp.gate_up_proj.weight"].T, 2, axis=-1)
        else:
            gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        f = (act(gate) * up) @ w[p + "mlp.down_proj.weight"].T
        x = x + (norm(f, w[p + "post_feedforward_layernorm.weight"]) if sandwich else f)
    x = norm(x, w["model.norm.weight"])
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    logits = x @ head.T
    if config.get("final_logit_softcapping"):
        cap = config["final_logit_softcapping"]
        logits = np.tanh(logits / cap) * cap
    return logits
