"""Which library runs CTranslate2's int8 matrix products on this CPU, and whether they can saturate.

CTranslate2 (4.x, ``src/cpu/backend.cc``) uses Intel MKL on Intel CPUs and oneDNN everywhere else;
``CT2_USE_MKL=0``/``1`` overrides the choice. For int8 it shifts the activations to unsigned bytes and multiplies
them with the signed int8 weights. Without the VNNI instructions (AVX-512 VNNI or AVX-VNNI: AMD Zen 2 and Zen 3,
Intel before Cascade Lake) oneDNN does that with ``vpmaddubsw``, which adds two byte products into a 16-bit integer
and saturates: 255 x 127 x 2 is twice what it holds. MKL avoids it. Measured on an AMD EPYC (Zen 3, AVX2):
random-weight test models drift by 1.1-1.2 standard deviations of their logits under oneDNN against 0.12-0.15 under
MKL on the same machine; SmolLM2-135M agrees with its float32 self on 82.9 % of next tokens against 86.6 % (see
docs/converting-models.md). MKL on an AMD CPU is far slower, so oneDNN stays; this module says which path runs.
"""

from __future__ import annotations

import os
from functools import lru_cache

_TRUE = {"1", "true", "yes", "on"}


@lru_cache(maxsize=1)
def _cpu_flags_and_vendor() -> tuple[frozenset[str], str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return frozenset(), ""
    flags: frozenset[str] = frozenset()
    vendor = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        if vendor and flags:
            break
    return flags, vendor


def int8_gemm_backend(environ: dict[str, str] | None = None) -> str:
    """``"MKL"`` or ``"oneDNN"``: what CTranslate2 multiplies int8 matrices with on this CPU."""
    environ = os.environ if environ is None else environ
    forced = environ.get("CT2_USE_MKL", "").strip().lower()
    if forced:
        return "MKL" if forced in _TRUE else "oneDNN"
    return "MKL" if _cpu_flags_and_vendor()[1] == "GenuineIntel" else "oneDNN"


def has_vnni() -> bool:
    flags = _cpu_flags_and_vendor()[0]
    return "avx512_vnni" in flags or "avx_vnni" in flags


def int8_products_may_saturate(environ: dict[str, str] | None = None) -> bool:
    """True on oneDNN without VNNI, where pairs of int8 products saturate at 16 bits (module docstring)."""
    return int8_gemm_backend(environ) == "oneDNN" and not has_vnni()


def describe() -> str:
    """One line for the start log: the int8 path and its caveat."""
    backend = int8_gemm_backend()
    if int8_products_may_saturate():
        return (f"int8 products on {backend} without VNNI: pairs of products saturate at 16 bits, so int8 answers "
                "drift further from float32 than on MKL or VNNI CPUs (docs/converting-models.md, int8 fidelity)")
    return f"int8 products on {backend}" + (" with VNNI" if has_vnni() else "")
