"""The prompt cache, side by side in one run: this server with its cache, the same server without it
(``LLM_PROMPT_CACHE_MB=0``, what it did before), and llama.cpp's own ``llama-server`` (its slots keep the
previous request's KV cache and reuse the longest common prefix).

    python bench/prompt_cache.py [--quick] [--no-peer] [--think 0 3]

1. a 1,000-word system prompt and a short question: time to first token cold (a system prompt never seen), then
   warm (the same system prompt, another question);
2. a 5-turn conversation under the same system prompt (other questions): each turn's time to first token, the
   next turn sent ``--think`` seconds after the answer (0: at once; a person takes longer to read and type);
3. 8 concurrent streaming clients in a closed loop, greedy, 64 tokens each: all with one system prompt (shared), and
   with 4 different ones (mixed): aggregate tokens/s with and without the cache;
4. ``--distinct`` requests (300) with distinct 500-word system prompts against a server with a small budget
   (``LLM_PROMPT_CACHE_MB``): the worker's peak resident memory over its size after loading, against the budget,
   and whether every request was answered.

llama-server is built once from the llama-cpp-python sdist (``bench/llama_cpp_build.py``) and serves the default
model's own GGUF file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time

import requests

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from throughput import ROOT, percentile, start_server, stop, stream_chat, worker_rss_mb  # noqa: E402

WORDS = ("customer order invoice shipping refund warranty account password delivery return discount payment "
         "subscription support privacy cookie gift card policy section business days politely answer never promise "
         "store manager weekend holiday express standard tracking number address change cancel upgrade").split()


def system_prompt(seed: int, words: int = 1000) -> str:
    rng = random.Random(seed)
    sentences, count = [], 0
    while count < words:
        sentence = [rng.choice(WORDS) for _ in range(rng.randint(8, 16))]
        sentences.append(" ".join(sentence).capitalize() + ".")
        count += len(sentence)
    return f"You are assistant number {seed} of Example Store. Follow these rules. " + " ".join(sentences)


QUESTIONS = ["What are your opening hours?", "How do I return a parcel?", "Can I change my delivery address?",
             "Do you ship abroad?", "How long does a refund take?", "Is my password stored safely?",
             "Can I pay with a gift card?", "What does express shipping cost?"]


def ask(base: str, messages: list[dict[str, str]], max_tokens: int, session=None, exact: bool = False) -> tuple[float, str, int]:
    """(time to first token, answer, generated tokens) of one streamed greedy chat completion."""
    body = {"model": "bench", "messages": messages, "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "stream_options": {"include_usage": True}}
    if exact:
        body.update(min_tokens=max_tokens, ignore_eos=True)  # ours reads min_tokens, llama-server ignore_eos
    first, text, count, _ = stream_chat(session or requests.Session(), base, body)
    return first, text, count


# ----------------------------------------------------------------------------- the three servers
class Peer:
    def __init__(self, log_dir: str, slots: int = 4, context: int = 4096):
        from peer import start_llama_server

        from llm_blueprint.engine.default_model import default_gguf_path

        self.process, self.base = start_llama_server(default_gguf_path(), log_dir, "prompt-cache", slots, context)

    def close(self) -> None:
        stop(self.process)


class Ours:
    def __init__(self, model_dir: str, log_dir: str, name: str, env: dict[str, str]):
        self.process, self.base = start_server(model_dir, log_dir, name, env)

    def close(self) -> None:
        stop(self.process)


# ----------------------------------------------------------------------------- the measurements
def same_system_prompt(base: str, seed: int) -> dict[str, float]:
    system = system_prompt(seed)
    cold = ask(base, [{"role": "system", "content": system}, {"role": "user", "content": QUESTIONS[0]}], 8)[0]
    warm = [ask(base, [{"role": "system", "content": system}, {"role": "user", "content": q}], 8)[0]
            for q in QUESTIONS[1:4]]
    return {"cold": cold, "warm": percentile(warm, 0.5)}


def conversation(base: str, seed: int, think: float, turns: int = 5, first: int = 0) -> list[float]:
    """Each turn's TTFT in a conversation under system prompt ``seed``, questions from ``QUESTIONS[first]`` on."""
    messages = [{"role": "system", "content": system_prompt(seed)}]
    ttfts = []
    for turn in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[(first + turn) % len(QUESTIONS)]})
        ttft, answer, _ = ask(base, messages, 48)
        ttfts.append(ttft)
        messages.append({"role": "assistant", "content": answer})
        time.sleep(think)
    return ttfts


def closed_loop(base: str, systems: list[str], clients: int = 8, seconds: float = 30, tokens: int = 64) -> float:
    """Aggregate generated tokens/s of ``clients`` streaming clients, client k under system prompt k % len(systems), in
    the steady state: one untimed request per system prompt first (each server then holds what it keeps of it; a
    1,000-word prompt's first round would otherwise be most of a short window)."""
    for k, system in enumerate(systems):
        ask(base, [{"role": "system", "content": system}, {"role": "user", "content": QUESTIONS[-1 - k]}], 4)
    generated = [0]
    lock = threading.Lock()
    errors: list[BaseException] = []
    stop_at = time.perf_counter() + seconds

    def client(k: int) -> None:
        session = requests.Session()
        r = 0
        try:
            while time.perf_counter() < stop_at:
                messages = [{"role": "system", "content": systems[k % len(systems)]},
                            {"role": "user", "content": QUESTIONS[(k + r) % len(QUESTIONS)]}]
                _, _, count = ask(base, messages, tokens, session, exact=True)
                with lock:
                    generated[0] += count
                r += 1
        except Exception as exc:  # noqa: BLE001 - reported
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} clients failed: {errors[0]!r}")
    return generated[0] / (time.perf_counter() - started)


def memory_bound(model_dir: str, log_dir: str, budget_mb: int, requests_count: int) -> dict[str, float]:
    """The workload against a server with the budget and against one without a cache (what the requests themselves
    need: each running request's own copy of its prompt state and its growing keys and values)."""
    cached = _peak_memory(model_dir, log_dir, budget_mb, requests_count)
    plain = _peak_memory(model_dir, log_dir, 0, requests_count)
    return {**cached, "plain_growth_mb": plain["growth_mb"], "net_growth_mb": cached["growth_mb"] - plain["growth_mb"],
            "plain_answered": plain["answered"]}


def _peak_memory(model_dir: str, log_dir: str, budget_mb: int, requests_count: int) -> dict[str, float]:
    server = Ours(model_dir, log_dir, f"memory-{budget_mb}", {"LLM_PROMPT_CACHE_MB": str(budget_mb)})
    try:
        baseline = worker_rss_mb(server.process.pid)
        peak = [baseline]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], worker_rss_mb(server.process.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        answered = 0
        session = requests.Session()
        started = time.perf_counter()
        for i in range(requests_count):
            messages = [{"role": "system", "content": system_prompt(10_000 + i, words=500)},
                        {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
            reply = session.post(server.base + "/v1/chat/completions", timeout=600,
                                 json={"model": "bench", "messages": messages, "max_tokens": 4, "temperature": 0})
            answered += reply.status_code == 200 and bool(reply.json()["choices"])
        elapsed = time.perf_counter() - started
        done.set()
        sampler.join()
        metrics = requests.get(server.base + "/metrics", timeout=10).text
        swaps = sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("llm_prompt_cache_swaps_total"))
        return {"baseline_mb": baseline, "peak_mb": peak[0], "growth_mb": peak[0] - baseline, "budget_mb": budget_mb,
                "answered": answered, "requests": requests_count, "swaps": swaps, "seconds": elapsed}
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="shorter loops, 60 distinct prompts")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--think", type=float, nargs="+", default=[0.0, 3.0])
    parser.add_argument("--distinct", type=int, default=300)
    parser.add_argument("--budget-mb", type=int, default=768)
    parser.add_argument("--parts", default="servers,memory",
                        help="servers (1-3) and/or memory (4); loops: only the closed loops of 3; turns: only 1-2")
    args = parser.parse_args()
    seconds = 12 if args.quick else 60
    distinct = 60 if args.quick else args.distinct

    from llm_blueprint.engine.default_model import prepare_default_model

    model_dir = prepare_default_model(os.environ.get("LLM_CACHE_DIR"))
    log_dir = tempfile.mkdtemp(prefix="bench-prompt-cache-")
    print(f"logs: {log_dir}", flush=True)
    servers = {"cache": lambda: Ours(model_dir, log_dir, "cache", {}),
               "no cache": lambda: Ours(model_dir, log_dir, "nocache", {"LLM_PROMPT_CACHE_MB": "0"})}
    if not args.no_peer:
        servers["llama-server"] = lambda: Peer(log_dir)
    results: dict[str, dict] = {}
    shared = [system_prompt(1)]
    mixed = [system_prompt(1 + k) for k in range(4)]
    parts = set(args.parts.split(","))
    for name, make in servers.items() if parts & {"servers", "loops", "turns"} else ():
        server = make()
        try:
            r = results[name] = {}
            if parts & {"servers", "turns"}:
                r["same"] = same_system_prompt(server.base, seed=100)
            for i, think in enumerate(args.think if parts & {"servers", "turns"} else ()):
                # Under the same system prompt as (1), as the issue measured it (so turn 1 too finds it held), and
                # questions of its own, so that no conversation replays another's prompts.
                r[f"turns think {think:g}"] = conversation(server.base, seed=100, think=think, first=4 + i)
            if parts & {"servers", "loops"}:
                r["shared 8"] = closed_loop(server.base, shared, seconds=seconds)
                r["mixed 8"] = closed_loop(server.base, mixed, seconds=seconds)
        finally:
            server.close()
        print(name, json.dumps(r), flush=True)

    report(results, args.think)
    if "memory" in parts:
        report_memory(memory_bound(model_dir, log_dir, args.budget_mb, distinct))


def report(results: dict[str, dict], thinks: list[float]) -> None:
    if not results:
        return
    measured_ttft = all("same" in r for r in results.values())
    if measured_ttft:
        print("\n== same 1,000-word system prompt, a new question: TTFT ms ==")
    for name, r in results.items() if measured_ttft else ():
        same = r["same"]
        print(f"{name:>13}: cold {same['cold'] * 1000:7.0f}   warm {same['warm'] * 1000:6.0f}   "
              f"warm/cold {same['warm'] / same['cold']:.3f}")
    for think in thinks if measured_ttft else ():
        key = f"turns think {think:g}"
        print(f"\n== 5-turn conversation, next turn {think:g} s after the answer: TTFT ms per turn ==")
        for name, r in results.items():
            print(f"{name:>13}: " + " ".join(f"{t * 1000:6.0f}" for t in r[key]))
        if "no cache" in results:
            ratios = [a / b for a, b in zip(results["cache"][key], results["no cache"][key], strict=True)]
            print(f"  cache / no cache per turn: {' '.join(f'{x:.2f}' for x in ratios)}   (target <= 0.3 each)")
        if "llama-server" in results:
            ratios = [a / b for a, b in zip(results["cache"][key], results["llama-server"][key], strict=True)]
            print(f"  cache / llama-server per turn: {' '.join(f'{x:.2f}' for x in ratios)}   (target <= 1.5 each, "
                  "issue #34)")
        turns = results["cache"][key] if "cache" in results else []
        if turns:
            print(f"  cache: last turn / first turn {turns[-1] / turns[0]:.2f}   (flat as the conversation grows)")
    if not all("shared 8" in r for r in results.values()):
        return
    print("\n== 8 streaming clients, 64 tokens each: aggregate tokens/s ==")
    for name, r in results.items():
        print(f"{name:>13}: shared system prompt {r['shared 8']:6.1f}   4 mixed system prompts {r['mixed 8']:6.1f}")
    if "no cache" in results:
        c, n = results["cache"], results["no cache"]
        print(f"  shared: cache / no cache {c['shared 8'] / n['shared 8']:.2f} (target >= 1);  "
              f"mixed: cache / no cache {c['mixed 8'] / n['mixed 8']:.2f} (target >= 0.9)")



def report_memory(memory: dict[str, float]) -> None:
    print(f"\n== {memory['requests']} requests with distinct 500-word system prompts, LLM_PROMPT_CACHE_MB="
          f"{memory['budget_mb']} ==")
    print(f"  worker RSS after load {memory['baseline_mb']:.0f} MB, peak {memory['peak_mb']:.0f} MB: growth "
          f"{memory['growth_mb']:.0f} MB = {memory['growth_mb'] / memory['budget_mb']:.2f} x the budget; "
          f"answered {memory['answered']}/{memory['requests']}; {memory['swaps']:.0f} generator swaps; "
          f"{memory['seconds']:.0f} s")
    print(f"  the same requests without a cache: growth {memory['plain_growth_mb']:.0f} MB (answered "
          f"{memory['plain_answered']}); the cache's own: {memory['net_growth_mb']:.0f} MB = "
          f"{memory['net_growth_mb'] / memory['budget_mb']:.2f} x the budget (target <= 1.1)")


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
