"""The measured thread layout against a fixed one, side by side: aggregate tokens/s and TTFT at c concurrent clients.

    python bench/layout.py [--concurrency 1 16] [--tokens 64] [--rounds 2] [--fixed 2 2 8]

Two servers (``gunicorn -k gevent``, the default model) run side by side: one
with its measured layout (the defaults), one pinned to ``--fixed INTER INTRA
BATCH`` (default 2 x 2, batches of 8: the layout before the measurement
existed). The same closed-loop streaming clients drive them in alternating
rounds so that machine noise hits both alike.
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
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fixed", type=int, nargs=3, default=[2, 2, 8], metavar=("INTER", "INTRA", "BATCH"))
    args = parser.parse_args()

    from llm_blueprint.engine.default_model import prepare_default_model

    model_dir = prepare_default_model(os.environ.get("LLM_CACHE_DIR") or None)
    log_dir = tempfile.mkdtemp(prefix="bench-layout-")
    inter, intra, batch = args.fixed
    fixed = {"LLM_INTER_THREADS": str(inter), "LLM_INTRA_THREADS": str(intra), "LLM_MAX_BATCH_SIZE": str(batch)}
    servers = {"measured": start_server(model_dir, log_dir, "measured", {}),
               f"fixed {inter}x{intra} b{batch}": start_server(model_dir, log_dir, "fixed", fixed)}
    with open(os.path.join(log_dir, "server-measured.log")) as f:
        chosen = [line.strip() for line in f if "engine layout" in line]
    print(f"model {model_dir}, {os.cpu_count()} cores, logs in {log_dir}\n{chosen[-1] if chosen else ''}", flush=True)
    figures: dict[tuple[str, int], list[dict]] = {}
    try:
        for r in range(args.rounds):
            for c in args.concurrency:
                names = list(servers) if r % 2 == 0 else list(reversed(servers))
                for name in names:
                    result = drive(servers[name][1], "bench", c, args.tokens, 2)
                    figures.setdefault((name, c), []).append(result)
                    print(f"round {r + 1} c={c:<3} {name:>16}: {result['tokens_per_s']:7.1f} tok/s, ttft p95 {result['ttft_p95']:.3f}s",
                          flush=True)
    finally:
        for process, _ in servers.values():
            stop(process)

    def mean(name: str, c: int, key: str) -> float:
        return sum(f[key] for f in figures[(name, c)]) / len(figures[(name, c)])

    names = list(servers)
    print(f"\n{'c':>3} " + " ".join(f"{n + ' tok/s':>22} {'p95':>6}" for n in names) + "   ratio")
    for c in args.concurrency:
        cells = " ".join(f"{mean(n, c, 'tokens_per_s'):>22.1f} {mean(n, c, 'ttft_p95'):>6.2f}" for n in names)
        print(f"{c:>3} {cells}   {mean(names[0], c, 'tokens_per_s') / mean(names[1], c, 'tokens_per_s'):.2f}")


if __name__ == "__main__":
    main()
