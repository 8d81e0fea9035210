"""The engine's thread layout: replicas (``inter_threads``) × OpenMP threads each (``intra_threads``), and the batch size.

What runs fastest depends on the model and the machine, and the wrong choice
costs about half the engine's speed. Measured on a 2-core machine: SmolLM2-135M
runs 1.6× faster single-stream and 1.3× faster at 16 concurrent completions as
2 replicas × 1 thread than as 1 × 2, while a 1B model is faster as 1 × 2;
replicas × threads above the cores always lose. So the layout is measured
once: every split of the usable cores generates a short single stream and a
full batch per replica, and the split that keeps both closest to their best
wins (the larger of the two shortfalls is the smallest). Then the batch size
per replica grows while it still pays. The result is cached per model, device,
compute type, core count and CTranslate2 version, so a restart reads it and never
measures again. A measurement during which other processes kept the cores busy
(more than ``BUSY_SHARE`` of them, from ``/proc/stat``: every start of a shared
on-prem server) is cached too, marked with that share: under load the single-thread
splits win (an OpenMP thread preempted by another process stalls its team), which
is also what serves best on such a machine. ``llm-blueprint layout --measure``
measures again on demand (when the machine is quiet) and replaces the cached
layout; ``LLM_INTER_THREADS``, ``LLM_INTRA_THREADS`` and ``LLM_MAX_BATCH_SIZE``
skip the measurement. Settings given explicitly are never second-guessed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass

from filelock import FileLock

from .handoff import NativeThread

log = logging.getLogger(__name__)

CALIBRATION_TOKENS = 24
CALIBRATION_PROMPT_TOKENS = 32
BATCH_SIZES = (8, 16, 32)
BATCH_GAIN = 1.1  # a larger batch must beat the smaller one by this much to be chosen
LAYOUT_VERSION = 1
BUSY_SHARE = 0.15  # other processes' share of our cores during a measurement beyond which it is marked busy


@dataclass(frozen=True)
class Layout:
    inter_threads: int
    intra_threads: int
    max_batch_size: int
    how: str  # "settings", "measured", "measured on a busy machine", "cached", "cached (measured on a busy machine)"
    # or "device"
    busy_share: float = 0.0  # other processes' share of the cores while it was measured


def usable_cores() -> int:
    """CPUs this process may run on, shared between the gunicorn workers (``LLM_WORKERS``) of one host."""
    cores = len(_cores())
    workers = max(1, int(os.environ.get("LLM_WORKERS", "1") or 1))
    return max(1, cores // workers)


def splits(cores: int) -> list[tuple[int, int]]:
    """(replicas, threads each) pairs that use the cores exactly, at most 8 replicas."""
    return [(inter, cores // inter) for inter in range(1, min(cores, 8) + 1) if cores % inter == 0]


def choose(path: str, device: str, compute_type: str, cache_dir: str, cores: int | None = None,
           inter_threads: int | None = None, intra_threads: int | None = None, max_batch_size: int | None = None,
           measure: bool = False) -> Layout:
    """The layout to load ``path`` with: the settings when they give it all, else read from the cache, else measured
    (and cached). ``measure``: measure again and replace the cached layout (``llm-blueprint layout --measure``)."""
    cores = cores or usable_cores()
    if device != "cpu":  # a GPU is fed by batches, not threads
        return Layout(inter_threads or 1, intra_threads or 1, max_batch_size or 32, "device")
    if inter_threads and intra_threads and max_batch_size:
        return Layout(inter_threads, intra_threads, max_batch_size, "settings")
    if inter_threads or intra_threads:  # one given: the other fills the cores
        inter = inter_threads or max(1, cores // intra_threads)
        intra = intra_threads or max(1, cores // inter)
        fixed = [(inter, intra)]
    else:
        fixed = None
    key = _cache_key(path, device, compute_type, cores, fixed)
    cache_file = os.path.join(cache_dir, "layouts.json")
    os.makedirs(cache_dir, exist_ok=True)
    with FileLock(cache_file + ".lock"):  # workers starting together measure once, not against each other
        cached = None if measure else _read(cache_file).get(key)
        if cached:
            busy = float(cached.get("busy_share", 0.0))
            how = "cached" if busy <= BUSY_SHARE else "cached (measured on a busy machine)"
            layout = Layout(cached["inter_threads"], cached["intra_threads"], cached["max_batch_size"], how, busy)
        else:
            layout = _measure(path, device, compute_type, fixed or splits(cores))
            entries = _read(cache_file)
            entries[key] = asdict(layout)
            _write(cache_file, entries)
    if max_batch_size:
        layout = Layout(layout.inter_threads, layout.intra_threads, max_batch_size, layout.how, layout.busy_share)
    return layout


def _cache_key(path: str, device: str, compute_type: str, cores: int, fixed) -> str:
    import ctranslate2

    weights = os.path.join(path, "model.bin")
    stat = os.stat(weights)
    backend = [os.environ.get(name) for name in ("CT2_USE_MKL", "CT2_FORCE_CPU_ISA", "CT2_USE_EXPERIMENTAL_PACKED_GEMM")]
    parts = [os.path.abspath(path), stat.st_size, int(stat.st_mtime), device, compute_type, cores, ctranslate2.__version__,
             backend, LAYOUT_VERSION, fixed]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def _read(cache_file: str) -> dict:
    try:
        with open(cache_file, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(cache_file: str, entries: dict) -> None:
    temporary = f"{cache_file}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(entries, f, indent=1)
    os.replace(temporary, cache_file)


def _measure(path: str, device: str, compute_type: str, candidates: list[tuple[int, int]]) -> Layout:
    import ctranslate2

    started = time.monotonic()
    machine, own = _busy_cpu_seconds(), _own_cpu_seconds()
    prompt = _prompt(path)

    def load(inter: int, intra: int):
        generator = ctranslate2.Generator(path, device=device, compute_type=compute_type, inter_threads=inter,
                                          intra_threads=intra)
        _generate(generator, [prompt], 2)  # warm-up
        return generator

    # One candidate's weights in memory at a time: a large model must not be loaded once per split.
    results = {}
    for inter, intra in candidates:
        generator = load(inter, intra)
        results[(inter, intra)] = (_rate(generator, 1, 1, prompt), _rate(generator, inter, BATCH_SIZES[0], prompt))
        del generator
    best_single = max(single for single, _ in results.values())
    best_full = max(full for _, full in results.values())

    def shortfall(split) -> float:
        single, full = results[split]
        return max(1 - single / best_single, 1 - full / best_full)

    inter, intra = min(results, key=lambda s: (shortfall(s), -s[0]))
    single, rate = results[(inter, intra)]
    batch = BATCH_SIZES[0]
    if len(BATCH_SIZES) > 1:
        generator = load(inter, intra)
        for size in BATCH_SIZES[1:]:
            larger = _rate(generator, inter, size, prompt)
            if larger < rate * BATCH_GAIN:
                break
            batch, rate = size, larger
        del generator
    # The candidates' buffers stay in the heap (the raised mmap threshold keeps freed memory there): hand them back.
    # Measured on SmolLM2-135M: 178 MB resident after measuring, 43 MB after this.
    from .prompt_cache import release_freed_memory

    release_freed_memory()
    elapsed = time.monotonic() - started
    others = _busy_cpu_seconds() - machine - (_own_cpu_seconds() - own)
    share = others / (elapsed * len(_cores())) if machine >= 0 and elapsed > 0 else 0.0
    how = "measured" if share <= BUSY_SHARE else "measured on a busy machine"
    log.info("thread layout measured in %.1fs over %s: %d replica(s) x %d thread(s), batch %d "
             "(single stream %.0f tok/s, %d x batch %d: %.0f tok/s); other processes used %.0f%% of the cores%s",
             elapsed, candidates, inter, intra, batch, single, inter, batch, rate, 100 * share,
             "" if how == "measured" else ": cached all the same (`llm-blueprint layout --measure` measures again "
             "when the machine is quiet)")
    return Layout(inter, intra, batch, how, round(share, 3))


def _cores() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return list(range(os.cpu_count() or 1))


def _busy_cpu_seconds() -> float:
    """CPU seconds spent by every process on this process's cores since boot (-1 where /proc/stat is missing)."""
    wanted = {f"cpu{n}" for n in _cores()}
    busy = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] in wanted:
                    values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
                    busy += sum(values) - values[3] - values[4]
    except (OSError, ValueError):
        return -1.0
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _prompt(path: str) -> list[str]:
    """A fixed prompt of ordinary tokens (what they say does not matter for speed)."""
    from .tokenizer import load_vocabulary

    vocabulary = load_vocabulary(path)
    return [vocabulary[(17 * i + 1001) % len(vocabulary)] for i in range(CALIBRATION_PROMPT_TOKENS)]


def _generate(generator, prompts, tokens: int) -> None:
    generator.generate_batch(prompts, max_length=tokens, min_length=tokens, include_prompt_in_result=False, sampling_topk=1)


def _rate(generator, replicas: int, batch: int, prompt: list[str], tokens: int = CALIBRATION_TOKENS,
          prompts: list[list[str]] | None = None) -> float:
    """Generated tokens/s with ``replicas`` concurrent calls of ``batch`` prompts each: ``prompt`` repeated, or the
    first ``replicas`` x ``batch`` of ``prompts`` in turn (bench/peer.py sweeps it on the servers' chat prompts)."""
    errors: list[BaseException] = []
    calls = [prompts[i * batch:(i + 1) * batch] for i in range(replicas)] if prompts else [[prompt] * batch] * replicas

    def run(call: list[list[str]]) -> None:
        try:
            _generate(generator, call, tokens)
        except BaseException as exc:
            errors.append(exc)

    threads = [NativeThread(lambda call=call: run(call), f"llm-layout-{i}") for i, call in enumerate(calls)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return replicas * batch * tokens / elapsed
