"""An independent numpy forward pass over dequantized GGUF weights.

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
