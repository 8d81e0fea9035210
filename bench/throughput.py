"""Throughput and latency, side by side in one run on one machine.

    python bench/throughput.py [--quick] [--no-peer] [--concurrency 1 4 8 16]

1. the raw engine: ``generate_batch`` on the same prompts, one batch of c
   prompts per concurrency level, no HTTP (the limit);
2. this server under ``gunicorn -k gevent`` (``wsgi:app``), driven over HTTP
   by c streaming clients in a closed loop;
3. llama-cpp-python's OpenAI server on the very same GGUF file (the peer),
   same prompts, same clients (skipped with --no-peer or when
   ``llama_cpp`` is not importable; install it with
   ``pip install 'llama-cpp-python[server]'``).

Every completion is greedy and exactly ``--tokens`` long (``min_tokens`` /
``min_length`` = ``max_tokens``) so all three generate the same amount.
Prints aggregate generated tokens/s, time-to-first-token p50/p95, the target
ratios, and the server worker's resident memory before/after
``--memory-requests`` sequential requests.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TOPICS = ["a lighthouse keeper", "a lost robot", "the first snow of winter", "a city under the sea", "a dragon who cannot fly",
          "an old clockmaker", "a journey across the desert", "a library that never closes", "a cat who runs a bakery",
          "two rival chefs", "a comet over a village", "a train that goes nowhere", "a garden on the moon",
          "a pirate who hates the sea", "the last day of summer", "a mapmaker's secret"]


def prompts() -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Write a long, detailed story about {t}."}] for t in TOPICS]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


# ----------------------------------------------------------------------------- 1. raw engine
def bench_raw(model_dir: str, concurrencies: list[int], tokens: int, rounds: int) -> dict[int, dict[str, float]]:
    from llm_blueprint.engine import Model, ModelOptions

    model = Model(model_dir, ModelOptions(device="cpu", inter_threads=1, intra_threads=os.cpu_count() or 1))
    batches = [model.tokenizer.ids_to_tokens(model.encode_chat(p)) for p in prompts()]
    model.generator.generate_batch(batches[:1], max_length=4, include_prompt_in_result=False)  # warm-up
    results = {}
    for c in concurrencies:
        generated, elapsed = 0, 0.0
        for r in range(rounds):
            batch = [batches[(r * c + i) % len(batches)] for i in range(c)]
            started = time.perf_counter()
            out = model.generator.generate_batch(batch, max_length=tokens, min_length=tokens, include_prompt_in_result=False,
                                                 sampling_topk=1, end_token=model.end_tokens)
            elapsed += time.perf_counter() - started
            generated += sum(len(o.sequences_ids[0]) for o in out)
        results[c] = {"tokens_per_s": generated / elapsed}
    model.close()
    return results


# ----------------------------------------------------------------------------- 2./3. HTTP servers
def stream_chat(session, base: str, body: dict) -> tuple[float, str, int, int]:
    """One streamed chat completion: (time to its first content, the content, completion tokens from the usage chunk
    (0 when the server sends none), content chunks)."""
    started = time.perf_counter()
    first, text, count = None, [], 0
    with session.post(base + "/v1/chat/completions", json=body, stream=True, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                count = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    if first is None:
                        first = time.perf_counter() - started
                    text.append(choice["delta"]["content"])
    return (first if first is not None else float("nan")), "".join(text), count, len(text)


REQUESTS = itertools.count(1)


def drive(base: str, model_name: str, concurrency: int, tokens: int, per_client: int,
          extra_body: dict | None = None, keep_alive: bool = True, fresh: bool = False) -> dict[str, float]:
    """c clients, each streaming ``per_client`` chat completions back to back (``extra_body``: server-specific fields;
    ``keep_alive=False``: a new connection per request, for servers that close a streamed response's connection;
    ``fresh``: a request number opens each user message, so that no server answers a prompt it has seen whole before:
    llama-server's slots otherwise keep each repeated prompt and prefill one token of it)."""
    ttfts: list[float] = []
    generated = [0]
    lock = threading.Lock()
    all_prompts = prompts()

    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            run_client(k)
        except Exception as exc:
            errors.append(exc)

    def run_client(k: int) -> None:
        session = requests.Session()
        for r in range(per_client):
            if not keep_alive:
                session.close()
                session = requests.Session()
            messages = all_prompts[(k * per_client + r) % len(all_prompts)]
            if fresh:
                messages = [*messages[:-1], {**messages[-1], "content": f"[{next(REQUESTS)}] {messages[-1]['content']}"}]
            body = {"model": model_name, "messages": messages, "stream": True,
                    "max_tokens": tokens, "min_tokens": tokens, "temperature": 0, "stream_options": {"include_usage": True}, **(extra_body or {})}
            first, _, count, chunks = stream_chat(session, base, body)
            with lock:
                ttfts.append(first)
                # exact usage when the server reports it in streams; else one token per content chunk (llama-cpp-python)
                generated[0] += count or chunks

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} of {concurrency} clients failed; first: {errors[0]!r}")
    return {"tokens_per_s": generated[0] / elapsed, "ttft_p50": percentile(ttfts, 0.5), "ttft_p95": percentile(ttfts, 0.95),
            "requests": len(ttfts)}


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()


def start_server(model_dir: str, log_dir: str, name: str, extra_env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """``wsgi:app`` under the shipped gunicorn settings on a free port, warmed up; (process, base URL)."""
    port = free_port()
    env = {**os.environ, "LLM_MODEL_PATH": model_dir, "LLM_MODEL_ID": "bench", "LLM_EAGER_LOAD": "1",
           "LLM_BIND": f"127.0.0.1:{port}", "LLM_MAX_QUEUE": "256", **extra_env}
    log = open(os.path.join(log_dir, f"server-{name}.log"), "w")
    process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", os.path.join(ROOT, "gunicorn.conf.py"), "wsgi:app"],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base + "/readyz", process)
    drive(base, "bench", 1, 8, 1)  # warm-up
    return process, base


def worker_rss_mb(master_pid: int) -> float:
    children = subprocess.run(["pgrep", "-P", str(master_pid)], capture_output=True, text=True).stdout.split()
    total = 0.0
    for pid in children:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
    return total


def bench_server(model_dir: str, concurrencies, tokens, per_client, memory_requests, log_dir) -> tuple[dict, dict]:
    process, base = start_server(model_dir, log_dir, "throughput", {})
    try:
        results = {c: drive(base, "bench", c, tokens, per_client) for c in concurrencies}
        memory = {}
        if memory_requests:
            session = requests.Session()
            body = {"model": "bench", "messages": prompts()[0], "max_tokens": 8, "temperature": 0}
            for _ in range(20):
                session.post(base + "/v1/chat/completions", json=body, timeout=60)
            memory["rss_before_mb"] = worker_rss_mb(process.pid)
            for i in range(memory_requests):
                session.post(base + "/v1/chat/completions", json={**body, "messages": prompts()[i % len(TOPICS)]}, timeout=60)
            memory["rss_after_mb"] = worker_rss_mb(process.pid)
            memory["requests"] = memory_requests
        return results, memory
    finally:
        stop(process)


def bench_peer(gguf_path: str, concurrencies, tokens, per_client, log_dir) -> dict | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python not installed: peer skipped (pip install 'llama-cpp-python[server]')")
        return None
    port = free_port()
    log = open(os.path.join(log_dir, "peer.log"), "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", gguf_path, "--host", "127.0.0.1", "--port", str(port),
         "--n_threads", str(os.cpu_count() or 1), "--n_ctx", "2048", "--model_alias", "bench",
         "--interrupt_requests", "False"],  # its default aborts a running request when another arrives
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base + "/v1/models", process)
        drive(base, "bench", 1, 8, 1)
        return {c: drive(base, "bench", c, tokens, per_client) for c in concurrencies}
    finally:
        stop(process)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer tokens and requests: a few minutes")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--memory-requests", type=int, default=None)
    args = parser.parse_args()
    tokens = args.tokens or (64 if args.quick else 128)
    per_client = 1 if args.quick else 2
    memory_requests = args.memory_requests if args.memory_requests is not None else (100 if args.quick else 500)
    rounds = 1 if args.quick else 2

    from llm_blueprint.engine.default_model import default_gguf_path, prepare_default_model

    cache = os.environ.get("LLM_CACHE_DIR") or tempfile.mkdtemp(prefix="bench-cache-")
    model_dir = prepare_default_model(cache)
    log_dir = tempfile.mkdtemp(prefix="bench-logs-")
    print(f"model {model_dir}, {tokens} tokens per completion, {os.cpu_count()} cores, logs in {log_dir}", flush=True)

    raw = bench_raw(model_dir, args.concurrency, tokens, rounds)
    print("raw engine done", flush=True)
    server, memory = bench_server(model_dir, args.concurrency, tokens, per_client, memory_requests, log_dir)
    print("server done", flush=True)
    peer = None
    if not args.no_peer:
        try:
            peer = bench_peer(default_gguf_path(), args.concurrency, tokens, per_client, log_dir)
        except Exception as exc:  # a crashing peer is reported, not fatal: our figures still stand
            print(f"peer failed: {exc.__class__.__name__}: {exc} (see {log_dir}/peer.log)")

    print(f"\n{'c':>3} {'raw tok/s':>10} {'server tok/s':>13} {'ttft p50':>9} {'ttft p95':>9} {'peer tok/s':>11} {'peer p95':>9}")
    for c in args.concurrency:
        p = peer[c] if peer else None
        print(f"{c:>3} {raw[c]['tokens_per_s']:>10.1f} {server[c]['tokens_per_s']:>13.1f} {server[c]['ttft_p50']:>9.3f} "
              f"{server[c]['ttft_p95']:>9.3f} {p['tokens_per_s'] if p else float('nan'):>11.1f} {p['ttft_p95'] if p else float('nan'):>9.3f}")

    single_completion_s = tokens / server[1]["tokens_per_s"]
    print("\nratios (targets in brackets)")
    print(f"  server c=1 / raw engine c=1         {server[1]['tokens_per_s'] / raw[1]['tokens_per_s']:.2f}  [>= 0.9]")
    if 8 in server:
        print(f"  server c=8 / server c=1             {server[8]['tokens_per_s'] / server[1]['tokens_per_s']:.2f}  [>= 3]")
        if peer:
            print(f"  server c=8 / peer c=8               {server[8]['tokens_per_s'] / peer[8]['tokens_per_s']:.2f}  [>= 2.5]")
        print(f"  ttft p95 c=8 / one completion alone {server[8]['ttft_p95'] / single_completion_s:.2f}  [<= 0.25]")
    if memory:
        growth = memory["rss_after_mb"] / memory["rss_before_mb"] - 1
        print(f"  worker RSS {memory['rss_before_mb']:.0f} MB -> {memory['rss_after_mb']:.0f} MB after "
              f"{memory['requests']} sequential requests: {growth:+.1%}  [<= +10%]")


if __name__ == "__main__":
    main()
