"""The memory this process may use: the machine's, or its container's limit (cgroup v2 or v1) when lower."""

from __future__ import annotations

import os


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (empty where there is none)."""
    out = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path, encoding="ascii") as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


def total_memory() -> int:
    """Bytes of memory this process's machine or container has (0 when unknown)."""
    total = meminfo().get("MemTotal", 0)
    limit = _cgroup_limit()
    return min(total, limit) if total and limit else (total or limit or 0)


def prompt_cache_default_mb(chat_models: int = 1) -> int:
    """The prompt cache's default budget, per chat model: a quarter of the memory, shared by the gunicorn workers
    of the host (``LLM_WORKERS``) and the chat models of a worker; at least 256 MB. 2 GB where the memory is unknown."""
    total = total_memory()
    if not total:
        return 2048
    workers = max(1, int(os.environ.get("LLM_WORKERS", "1") or 1))
    return max(256, total // 4 // workers // max(1, chat_models) // 2**20)
