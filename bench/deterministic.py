"""What LLM_DETERMINISTIC costs: aggregate tokens/s with c concurrent streaming clients, mode off vs on.

    python bench/deterministic.py [--concurrency 8] [--tokens 64] [--rounds 3]

Two servers (``gunicorn -k gevent``, default settings, the default model)
run side by side, one with ``LLM_DETERMINISTIC=1``; the same closed-loop
clients (greedy, prompts of different lengths, every completion exactly
``--tokens`` long) drive them in alternating rounds, so machine noise hits
both alike. Prints tokens/s and TTFT per mode and the on/off ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from throughput import drive, start_server, stop  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from llm_blueprint.engine.default_model import prepare_default_model

    model_dir = prepare_default_model(os.environ.get("LLM_CACHE_DIR") or None)
    log_dir = tempfile.mkdtemp(prefix="bench-det-")
    print(f"model {model_dir}, c={args.concurrency}, {args.tokens} tokens per completion, {os.cpu_count()} cores, "
          f"logs in {log_dir}", flush=True)
    servers = {mode: start_server(model_dir, log_dir, mode, {"LLM_DETERMINISTIC": "1" if mode == "on" else "0"})
               for mode in ("off", "on")}
    figures: dict[str, list[dict]] = {"off": [], "on": []}
    try:
        for r in range(args.rounds):
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                result = drive(servers[mode][1], "bench", args.concurrency, args.tokens, 2)
                figures[mode].append(result)
                print(f"round {r + 1} {mode:>3}: {result['tokens_per_s']:.1f} tok/s, ttft p95 {result['ttft_p95']:.3f}s", flush=True)
    finally:
        for process, _ in servers.values():
            stop(process)

    def mean(mode: str, key: str) -> float:
        return sum(f[key] for f in figures[mode]) / len(figures[mode])

    print(f"\n{'mode':>5} {'tok/s':>8} {'ttft p50':>9} {'ttft p95':>9}")
    for mode in ("off", "on"):
        print(f"{mode:>5} {mean(mode, 'tokens_per_s'):>8.1f} {mean(mode, 'ttft_p50'):>9.3f} {mean(mode, 'ttft_p95'):>9.3f}")
    print(f"\nLLM_DETERMINISTIC on / off, aggregate tokens/s at c={args.concurrency}: "
          f"{mean('on', 'tokens_per_s') / mean('off', 'tokens_per_s'):.2f}")


if __name__ == "__main__":
    main()
