"""Assertions about how a greedy answer ended, without pinning what the model wrote.

int8 numerics differ between machines (MKL on Intel, oneDNN on AMD), so the
same prompt can end early on one machine and run to ``max_tokens`` on another.
These helpers accept either ending, but only the one that agrees with the count.
"""

from __future__ import annotations

import time

import requests


def ended_consistently(reason: str, tokens: int, max_tokens: int, natural=("stop",), cut: str = "length") -> None:
    """Either the model ended by itself before ``max_tokens`` or it was cut at exactly ``max_tokens``."""
    if reason == cut:
        assert tokens == max_tokens, (reason, tokens, max_tokens)
    else:
        assert reason in natural and tokens < max_tokens, (reason, tokens, max_tokens)


def wait_idle(base: str, timeout: float = 60) -> None:
    """Wait until the server runs and queues nothing (generations left by earlier tests have ended), so the next
    request is served alone and greedy outputs can be compared."""
    deadline = time.monotonic() + timeout
    while True:
        ready = requests.get(base + "/readyz", timeout=10).json()
        if not (ready.get("running") or ready.get("queued")):
            return
        assert time.monotonic() < deadline, f"server still busy after {timeout}s: {ready}"
        time.sleep(0.2)
