"""Memory: what this process may use (the machine's, or its container's limit when lower), what an engine batch costs,
and the budget that bounds the batches of a worker (``LLM_MEMORY_LIMIT_MB``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ContextTooLong
from .budget import Budget

MB = 2**20


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


def prompt_cache_default_mb(chat_models: int = 1, memory_limit_mb: int | None = None) -> int:
    """The prompt cache's default budget, per chat model: a quarter of the worker's memory (``LLM_MEMORY_LIMIT_MB``,
    else the machine's or container's shared by the host's gunicorn workers, ``LLM_WORKERS``), shared by the chat
    models of a worker; at least 256 MB. 2 GB where the memory is unknown."""
    worker = memory_limit_mb * MB if memory_limit_mb else 0
    if not worker:
        total = total_memory()
        if not total:
            return 2048
        worker = total // _workers()
    return max(256, worker // 4 // max(1, chat_models) // MB)


# ----------------------------------------------------------------------------- what a batch costs, and the budget
# Measured with CTranslate2 4.8.5 on CPU (bench/prefill_memory.py: peak RSS above the warmed model, 1 and 4 rows): a
# prefill holds LINEAR x the held state's bytes per token of context (keys and values, activations, copies; a
# sliding-window model, which CTranslate2 prefills in chunks of the window, copies its keys and values at every
# chunk), the attention scores of one layer at a time (SCORES x heads x queries x keys float32 values), buffers of
# each row whatever its length, and a workspace per call. The estimate is above every measured peak, on both int8
# paths (1.06 to 1.9 x; bench/RESULTS.md).
LINEAR = 1.25
LINEAR_WINDOWED = 2.4
SCORES = 1.3
PER_ROW = 48 * 2**20
WORKSPACE = 128 * 2**20
# With MKL (Intel CPUs, or CT2_USE_MKL=1) every call of 128 tokens or more also holds about two float32 copies of the
# (int8) embedding table for a moment: Gemma 3 270M (262,144 x 640) peaked 1,279 MB above its warmed state at any
# prompt length from 128 tokens, and went back after the call.
MKL_EMBEDDING_COPIES = 2.2


@dataclass(frozen=True)
class MemoryShape:
    """What a batch of a model costs in memory on CPU, from its spec."""

    state_bytes: int  # keys and values of every layer, per token (what a held state costs: prompt_cache.py)
    heads: int  # query heads
    window: int = 0  # sliding window (0: none): CTranslate2 then prefills in chunks of that many tokens
    item: int = 4  # bytes of one attention score (float32 on CPU)
    call_bytes: int = WORKSPACE  # held by every call whatever its rows

    @classmethod
    def of(cls, model_dir: str, window: int = 0) -> MemoryShape:
        """From a CTranslate2 model's spec (CPU, float32 states)."""
        from .cpu_backend import int8_gemm_backend
        from .prompt_cache import read_spec_summary, state_bytes_of

        try:
            summary = read_spec_summary(os.path.join(model_dir, "model.bin"))
            state = state_bytes_of(summary, "cpu")
        except (OSError, ValueError):
            return cls(state_bytes=0, heads=0, window=window)
        call = WORKSPACE
        if int8_gemm_backend() == "MKL":
            vocabulary, hidden = (tuple(summary["embeddings"]) + (0, 0))[:2]
            call += int(MKL_EMBEDDING_COPIES * vocabulary * hidden * 4)
        return cls(state_bytes=state, heads=int(summary["scalars"].get("decoder/num_heads", 0) or 0), window=window,
                   call_bytes=call)

    def row_bytes(self, new: int, context: int, prompt: int | None = None) -> int:
        """One row that prefills ``new`` tokens of a ``prompt`` (after a cached prefix) and grows to ``context``."""
        prompt = context if prompt is None else prompt
        queries = min(new, self.window) if self.window else new
        linear = LINEAR_WINDOWED if self.window else LINEAR
        return int(PER_ROW + linear * self.state_bytes * context + SCORES * self.heads * queries * prompt * self.item)

    def batch_bytes(self, rows: int, row_bytes: int) -> int:
        """A batch of ``rows`` rows of at most ``row_bytes`` each (CTranslate2 pads them to the longest)."""
        return self.call_bytes + rows * row_bytes

    def longest_context(self, room: int) -> int:
        """The most tokens of context a batch of one row may reach within ``room`` bytes (prefilled whole)."""
        low, high = 0, 1 << 24
        while low < high:
            middle = (low + high + 1) // 2
            if self.batch_bytes(1, self.row_bytes(middle, middle)) <= room:
                low = middle
            else:
                high = middle - 1
        return low


class MemoryBudget(Budget):
    """The worker's memory for engine batches, in MB: ``LLM_MEMORY_LIMIT_MB`` less what the process held before its
    first model (interpreter, libraries), each loaded chat model's weights and its prompt cache's budget. Every
    engine of the worker takes its batch's estimate (:class:`MemoryShape`) before the CTranslate2 call and gives it
    back after, so concurrent prefills never add up past the limit; a prompt that alone cannot fit is refused before
    it runs (``Engine.validate``)."""

    def __init__(self, limit_bytes: int, base_bytes: int):
        self.limit_bytes = limit_bytes
        self.base_bytes = base_bytes
        self.fixed: dict[str, int] = {}  # per chat model: its weights and its prompt cache's budget
        super().__init__(self._room_mb())

    def _room_mb(self) -> int:
        return max(1, (self.limit_bytes - self.base_bytes - sum(self.fixed.values())) // MB)

    @property
    def room_bytes(self) -> int:
        return self.capacity * MB

    def hold(self, name: str, nbytes: int) -> None:
        """A chat model's lasting share (weights, prompt cache): the batches get what is left."""
        self.fixed[name] = nbytes
        self.resize(self._room_mb())

    def drop(self, name: str) -> None:
        self.fixed.pop(name, None)
        self.resize(self._room_mb())


class EngineMemory:
    """One engine's share of the worker's :class:`MemoryBudget`: the context its requests may use, the rows a batch
    may hold, and the memory each batch takes before its CTranslate2 call. CPU only (on a GPU the batches live in
    the device's memory, which CTranslate2 manages): without a budget, nothing is bounded."""

    def __init__(self, model, budget: MemoryBudget | None):
        self.budget = budget if model.device == "cpu" else None
        self.shape = MemoryShape.of(model.path, model.sliding_window)
        self.model_context = model.context_length

    @property
    def context_limit(self) -> int:
        """The model's context, or less where the budget holds less."""
        if self.budget is None:
            return self.model_context
        return min(self.model_context, self.shape.longest_context(self.budget.room_bytes))

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """ContextTooLong, naming what the memory holds, for a request that could not fit even alone."""
        limit = self.context_limit
        if limit < self.model_context and prompt_tokens + max_tokens > limit:
            raise ContextTooLong(prompt_tokens, max_tokens, limit, model_context=self.model_context)

    def _row_bytes(self, entry, cached: int) -> int:
        prompt = len(entry.job.request.prompt_ids) + len(entry.generated)
        context = prompt + max(0, entry.job.request.max_tokens - entry.tokens)
        return self.shape.row_bytes(prompt - cached, context, prompt)

    def batch_bytes(self, entries: list, plan) -> int:
        """What a batch of entries (after the plan's cached prefix) may hold at its peak: CTranslate2 pads its rows
        to the longest one."""
        cached = plan.length if plan.read else 0
        return self.shape.batch_bytes(len(entries), max(self._row_bytes(e, cached) for e in entries))

    def rows_that_fit(self, entries: list, plan) -> int:
        """How many of ``entries`` (the first one first) one batch may hold (the scheduler's cap; at least one: a
        row that alone does not fit was refused by :meth:`check`)."""
        if self.budget is None:
            return len(entries)
        count = 1
        while count < len(entries) and self.batch_bytes(entries[: count + 1], plan) <= self.budget.room_bytes:
            count += 1
        return count

    def take(self, entries: list, plan) -> int:
        """Wait for a batch's memory (MB taken, for :meth:`release`)."""
        if self.budget is None:
            return 0
        return self.budget.acquire(-(-self.batch_bytes(entries, plan) // MB))

    def try_take(self, tokens: int) -> int:
        """Memory for a warm-up of ``tokens`` tokens if it is free now (MB taken, for release), else 0: a warm-up is
        worth doing only when it delays nothing. -1 without a budget."""
        if self.budget is None:
            return -1
        return self.budget.try_acquire(-(-self.shape.batch_bytes(1, self.shape.row_bytes(tokens, tokens)) // MB))

    def release(self, taken: int) -> None:
        if self.budget is not None and taken > 0:
            self.budget.release(taken)


def memory_limit_default(workers: int | None = None) -> int:
    """``LLM_MEMORY_LIMIT_MB`` unset: nine tenths of the machine's (or container's) memory, shared by the host's
    gunicorn workers (``LLM_WORKERS``); 0 (no limit) where the memory is unknown."""
    total = total_memory()
    return total * 9 // 10 // max(1, workers or _workers())


def _workers() -> int:
    """The host's gunicorn workers (``LLM_WORKERS``), which share its memory."""
    return max(1, int(os.environ.get("LLM_WORKERS", "1") or 1))


def resident_bytes() -> int:
    """This process's resident memory now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_resident_bytes() -> int:
    """This process's peak resident memory (VmHWM) since it started (0 where /proc is missing)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0
