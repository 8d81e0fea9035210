"""This server against llama.cpp's own ``llama-server``, side by side in one run, per model.

    python bench/peer.py [--models smollm2,1b] [--concurrency 1,4,8,16] [--tokens 128] [--tokens-1b 64]
                         [--rounds 2] [--quick]

Per model:
1. the raw engine (``generate_batch``, no HTTP) in every thread layout
   (replicas x threads = the cores) at 1, 8 and 16 concurrent completions
   (split evenly over the replicas) of the servers' own chat prompts: the
   limit (and, for reference, the best layout on 16 copies of one fixed
   32-token prompt, an easier workload);
2. this server under ``gunicorn -k gevent`` with its default settings;
3. ``llama-server -np 16 -t <cores> -c <16 x per-slot context>`` (llama.cpp
   built from the llama-cpp-python 0.3.36 sdist, bench/llama_cpp_build.py;
   continuous batching is its default) on GGUF files: SmolLM2's own packaged
   file, or for the 1B shape (bench/llama_1b.py, random weights, SmolLM2's
   tokenizer) its Q8_0 and Q4_K_M quantizations of the F16 file that our int8
   model is converted from.

Both servers get the same chat prompts from the same streaming clients, each
opened by a request number (no server sees a whole prompt twice; the system
prompt is shared as before), in alternating order each round, closed-loop
(each of c clients sends its next request when the last ends) and burst (c
clients, one request each, started together). Every completion is greedy and exactly ``--tokens`` long
(``min_tokens`` here, ``ignore_eos`` there). Per server and c: aggregate
tokens/s, TTFT p50/p95, server CPU seconds per generated token (utime+stime
of the server's process tree) and peak RSS (the tree's VmHWM summed), then the
ratios issues #15 and #34 ask for.

Memory (issue #34), per server: the tree's RSS once loaded and warmed up, its
peak over the run, and its RSS when idle again (5 s after the last request);
beside them, the bare engine's own peak for the same batch (a fresh process
that loads the model with ``ctranslate2.Generator`` in the server's layout and
runs the 16 chat prompts, ``--tokens`` each, split over the replicas as the
server does, twice).

Which int8 path runs (MKL or oneDNN, ``llm_blueprint.engine.cpu_backend``) is
printed first; ``--int8-paths both`` runs the whole bench once per path
(``CT2_USE_MKL=1`` and ``0``: on an Intel CPU both are native; on AMD the MKL
run is MKL on a CPU it was not tuned for).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]

from llama_1b import smollm2_vocab_gguf  # noqa: E402
from llama_cpp_build import binaries  # noqa: E402
from throughput import drive, free_port, prompts, start_server, stop, wait_ready  # noqa: E402

BATCHES = (1, 8, 16)
SLOT_CONTEXT = 512  # prompt (~30 tokens) + the longest completion, per llama-server slot
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                     "llm-blueprint", "bench-1b")


# ----------------------------------------------------------------------------- models
def prepare(model: str) -> tuple[str, dict[str, str]]:
    """(our CTranslate2 int8 directory, {peer label: GGUF path}) for ``model``, made once and cached."""
    from llm_blueprint.convert import convert_model
    from llm_blueprint.engine.default_model import default_gguf_path, prepare_default_model

    if model == "smollm2":
        return prepare_default_model(os.environ.get("LLM_CACHE_DIR") or None), {"Q4_1": default_gguf_path()}
    os.makedirs(CACHE, exist_ok=True)
    f16 = smollm2_vocab_gguf(os.path.join(CACHE, "llama-1b-shape-smollm2-vocab.F16.gguf"))
    peers = {}
    for kind in ("Q8_0", "Q4_K_M"):
        path = f16.replace(".F16.", f".{kind}.")
        if not os.path.isfile(path):
            subprocess.run([binaries()["llama-quantize"], f16, path + ".tmp", kind, str(os.cpu_count() or 1)],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            os.replace(path + ".tmp", path)
        peers[kind] = path
    ours = os.path.join(CACHE, "ct2-int8")
    if not os.path.isdir(ours):
        convert_model(f16, ours, quantization="int8", show_progress=False)
    return ours, peers


# ----------------------------------------------------------------------------- 1. raw engine
def chat_prompts(model_dir: str) -> list[list[str]]:
    """The prompts the servers get (the clients' chat messages through the model's template), as engine tokens."""
    from llm_blueprint.engine import Model, ModelOptions

    model = Model(model_dir, ModelOptions(device="cpu", inter_threads=1, intra_threads=1))
    try:
        return [model.tokenizer.ids_to_tokens(model.encode_chat(messages)) for messages in prompts()]
    finally:
        model.close()


def raw_sweep(model_dir: str, tokens: int) -> tuple[dict[tuple[int, int], dict[int, float]], float]:
    """{(replicas, threads): {concurrent completions: tokens/s}} on the servers' own chat prompts (n completions:
    the clients' first n prompts, split evenly over the replicas), one layout's generator in memory at a time; and
    the best layout's figure for 16 completions of one fixed 32-token prompt (easier: equal lengths, shorter)."""
    import ctranslate2

    from llm_blueprint.engine import layout

    prompt = layout._prompt(model_dir)
    chats = chat_prompts(model_dir)
    lengths = sorted(map(len, chats[:max(BATCHES)]))
    print(f"  raw engine on the servers' chat prompts ({lengths[0]}-{lengths[-1]} tokens)", flush=True)
    results = {}
    for inter, intra in layout.splits(layout.usable_cores()):
        generator = ctranslate2.Generator(model_dir, device="cpu", compute_type="int8", inter_threads=inter,
                                          intra_threads=intra)
        layout._rate(generator, 1, 1, prompt, 4)  # warm-up
        results[(inter, intra)] = {n: layout._rate(generator, min(inter, n), n // min(inter, n), prompt, tokens, chats)
                                   for n in BATCHES}
        print(f"  raw {inter} x {intra}: " + ", ".join(f"{n}: {r:.1f}" for n, r in results[(inter, intra)].items())
              + " tok/s", flush=True)
        del generator
    inter, intra = max(results, key=lambda split: results[split][16])
    generator = ctranslate2.Generator(model_dir, device="cpu", compute_type="int8", inter_threads=inter,
                                      intra_threads=intra)
    layout._rate(generator, 1, 1, prompt, 4)
    fixed = layout._rate(generator, inter, 16 // inter, prompt, tokens)
    print(f"  raw {inter} x {intra}, 16 x one fixed 32-token prompt: {fixed:.1f} tok/s", flush=True)
    del generator
    return results, fixed


# ----------------------------------------------------------------------------- process-tree accounting
def tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += [int(c) for c in subprocess.run(["pgrep", "-P", str(p)], capture_output=True, text=True).stdout.split()]
    return pids


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


def tree_status_mb(pid: int, field: str) -> float:
    """A /proc status field (``VmRSS``, ``VmHWM``) summed over the process tree, in MB."""
    total = 0.0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024
        except (OSError, StopIteration):
            pass
    return total


def peak_rss_mb(pid: int) -> float:
    return tree_status_mb(pid, "VmHWM")


def rss_mb(pid: int) -> float:
    return tree_status_mb(pid, "VmRSS")


BARE = """
import json, sys
import ctranslate2
from concurrent.futures import ThreadPoolExecutor

model_dir, inter, intra, tokens, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
prompts = json.load(open(path))
generator = ctranslate2.Generator(model_dir, device="cpu", compute_type="int8", inter_threads=inter, intra_threads=intra)
per = -(-len(prompts) // inter)
calls = [prompts[i:i + per] for i in range(0, len(prompts), per)]
def run(call):
    generator.generate_batch(call, max_length=tokens, min_length=tokens, include_prompt_in_result=False)
for _ in range(2):
    with ThreadPoolExecutor(len(calls)) as pool:
        list(pool.map(run, calls))
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) // 1024)
"""


def bare_peak_mb(model_dir: str, layout: tuple[int, int], tokens: int, log_dir: str) -> float:
    """The bare engine's peak RSS (MB) running the servers' 16 chat prompts in ``layout``, in a fresh process."""
    import json

    path = os.path.join(log_dir, "bare-prompts.json")
    with open(path, "w") as f:
        json.dump(chat_prompts(model_dir)[:16], f)
    done = subprocess.run([sys.executable, "-c", BARE, model_dir, str(layout[0]), str(layout[1]), str(tokens), path],
                          capture_output=True, text=True, check=True, timeout=1800)
    return float(done.stdout.split()[-1])


def server_layout(log_path: str) -> tuple[int, int]:
    """(replicas, threads) the server's log says it runs."""
    import re

    with open(log_path) as f:
        found = re.findall(r"engine layout of '[^']*': (\d+) replica\(s\) x (\d+) thread", f.read())
    return (int(found[-1][0]), int(found[-1][1])) if found else (1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------- 3. llama-server
def start_llama_server(gguf_path: str, log_dir: str, name: str, slots: int,
                       slot_context: int = SLOT_CONTEXT) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cores = str(os.cpu_count() or 1)
    log = open(os.path.join(log_dir, f"llama-server-{name}.log"), "w")
    process = subprocess.Popen([binaries()["llama-server"], "-m", gguf_path, "-np", str(slots), "-t", cores, "-tb", cores,
                                "-c", str(slots * slot_context), "--host", "127.0.0.1", "--port", str(port),
                                "--alias", "bench"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base + "/health", process)
    drive(base, "bench", 1, 8, 1, {"ignore_eos": True})  # warm-up
    return process, base


# ----------------------------------------------------------------------------- the run
def measure(process: subprocess.Popen, base: str, extra: dict, c: int, tokens: int, per_client: int) -> dict:
    before = cpu_seconds(process.pid)
    # llama-server closes streams' connections; fresh prompts: its slots would otherwise prefill one token of a prompt
    # repeated from an earlier round (its log: "selected slot by LCP similarity, f_sim_best = 1.000")
    result = drive(base, "bench", c, tokens, per_client, extra, keep_alive=False, fresh=True)
    generated = result["requests"] * tokens  # every completion is exactly ``tokens`` long
    return {**result, "cpu_per_token_ms": 1000 * (cpu_seconds(process.pid) - before) / generated}


def bench_model(model: str, concurrency: list[int], tokens: int, rounds: int, per_client: int, log_dir: str) -> dict:
    ours_dir, peer_files = prepare(model)
    print(f"\n== {model}: ours {ours_dir}; peers {peer_files}; {tokens} tokens per completion", flush=True)
    raw, fixed = raw_sweep(ours_dir, tokens)
    servers = {"ours": start_server(ours_dir, log_dir, model, {}) + ({},)}
    with open(os.path.join(log_dir, f"server-{model}.log")) as f:
        chosen = [line.strip() for line in f if "layout" in line]
    print(f"  ours: {chosen[-1] if chosen else '(no layout line in the log)'}", flush=True)
    loaded = {"ours": rss_mb(servers["ours"][0].pid)}
    # (the server idles meanwhile: a separate process, its memory apart)
    bare = bare_peak_mb(ours_dir, server_layout(os.path.join(log_dir, f"server-{model}.log")), tokens, log_dir)
    print(f"  bare engine peak RSS: {bare:.0f} MB", flush=True)
    try:
        for label, path in peer_files.items():
            servers[f"llama.cpp {label}"] = start_llama_server(path, log_dir, f"{model}-{label}", 16) + ({"ignore_eos": True},)
            loaded[f"llama.cpp {label}"] = rss_mb(servers[f"llama.cpp {label}"][0].pid)
        figures: dict[tuple[str, str, int], list[dict]] = {}
        for r in range(rounds):
            names = list(servers) if r % 2 == 0 else list(reversed(servers))
            for c in concurrency:
                for name in names:
                    process, base, extra = servers[name]
                    for mode, n in (("closed", per_client), ("burst", 1)):
                        result = measure(process, base, extra, c, tokens, n)
                        figures.setdefault((name, mode, c), []).append(result)
                        print(f"  round {r + 1} {mode:6s} c={c:<3} {name:18s} {result['tokens_per_s']:7.1f} tok/s  "
                              f"ttft p50 {result['ttft_p50']:6.2f}s p95 {result['ttft_p95']:6.2f}s  "
                              f"cpu {result['cpu_per_token_ms']:5.1f} ms/token  (load avg {os.getloadavg()[0]:.1f})", flush=True)
        rss = {name: peak_rss_mb(process.pid) for name, (process, _, _) in servers.items()}
        time.sleep(5)
        idle = {name: rss_mb(process.pid) for name, (process, _, _) in servers.items()}
    finally:
        for process, _, _ in servers.values():
            stop(process)
    mean = {key: {k: sum(f[k] for f in runs) / len(runs) for k in runs[0]} for key, runs in figures.items()}
    return {"raw": raw, "fixed": fixed, "figures": mean, "rss": rss, "servers": list(servers), "bare": bare,
            "loaded": loaded, "idle": idle}


def report(model: str, result: dict, concurrency: list[int]) -> None:
    raw, figures, rss = result["raw"], result["figures"], result["rss"]
    print(f"\n### {model}\n\nraw engine on the servers' chat prompts, tokens/s (replicas x threads; concurrent "
          "completions split over the replicas)")
    print(f"{'layout':>8} " + " ".join(f"{n:>8}" for n in BATCHES))
    for split, rates in raw.items():
        print(f"{split[0]:>4} x {split[1]:<1} " + " ".join(f"{rates[n]:>8.1f}" for n in BATCHES))
    print(f"\n{'server':18s} {'mode':6s} {'c':>3} {'tok/s':>7} {'p50 s':>6} {'p95 s':>6} {'cpu ms/tok':>10} {'peak RSS MB':>11}")
    for name in result["servers"]:
        for mode in ("closed", "burst"):
            for c in concurrency:
                f = figures[(name, mode, c)]
                print(f"{name:18s} {mode:6s} {c:>3} {f['tokens_per_s']:>7.1f} {f['ttft_p50']:>6.2f} {f['ttft_p95']:>6.2f} "
                      f"{f['cpu_per_token_ms']:>10.1f} {rss[name]:>11.0f}")

    def tps(name: str, mode: str, c: int) -> float:
        return figures[(name, mode, c)]["tokens_per_s"] if (name, mode, c) in figures else float("nan")

    best = {n: max(rates[n] for rates in raw.values()) for n in BATCHES}
    lines = [("ours c=1 / raw best single stream", tps("ours", "closed", 1) / best[1], ">= 0.95"),
             ("ours c=16 / raw best 16 concurrent", tps("ours", "closed", 16) / best[16], ">= 0.8"),
             ("  (the same against 16 x one fixed 32-token prompt)", tps("ours", "closed", 16) / result["fixed"], "")]
    peers = [name for name in result["servers"] if name != "ours"]
    for peer in peers:
        for mode in ("closed", "burst"):
            for c in (8, 16):
                target = ">= 1.5" if model == "smollm2" else {("Q8_0", 16): ">= 1.3", ("Q4_K_M", 16): ">= 0.9",
                                                               ("Q4_K_M", 8): ">= 0.8"}.get((peer.split()[-1], c), "")
                lines.append((f"ours / {peer} {mode} c={c}", tps("ours", mode, c) / tps(peer, mode, c), target))
        for mode in ("closed", "burst"):
            if (peer, mode, 16) in figures:
                lines.append((f"ttft p95 c=16 {mode} ours / {peer}", figures[("ours", mode, 16)]["ttft_p95"]
                              / figures[(peer, mode, 16)]["ttft_p95"], "<= 1" if model == "smollm2" else ""))
        lines.append((f"single stream {peer} / ours", tps(peer, "closed", 1) / tps("ours", "closed", 1),
                      "(expected 2.5-4)"))
    print(f"\nmemory, MB: {'server':18s} {'loaded':>7} {'peak':>7} {'idle':>7}   (bare engine, same batch: peak "
          f"{result['bare']:.0f})")
    for name in result["servers"]:
        print(f"            {name:18s} {result['loaded'][name]:>7.0f} {rss[name]:>7.0f} {result['idle'][name]:>7.0f}")
    lines.append(("peak RSS ours / bare engine", rss["ours"] / result["bare"], "<= 1.3"))
    for peer in peers:
        lines.append((f"peak RSS ours / {peer}", rss["ours"] / rss[peer], "<= 1" if peer.endswith("Q8_0") else ""))
    lines.append(("idle RSS ours / after load", result["idle"]["ours"] / result["loaded"]["ours"], "<= 1.1"))
    print("\nratios [targets]")
    for label, value, target in lines:
        print(f"  {label:48s} {value:6.2f}  {('[' + target + ']') if target else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,1b")
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--tokens", type=int, default=None, help="per completion (default 128, quick 32)")
    parser.add_argument("--tokens-1b", type=int, default=None, help="per completion on the 1B shape (default 64)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 2, quick 1)")
    parser.add_argument("--per-client", type=int, default=2, help="closed-loop requests per client")
    parser.add_argument("--quick", action="store_true", help="32 tokens, one round, one closed-loop request per client")
    parser.add_argument("--int8-paths", default="this", choices=("this", "both"),
                        help="this: the path CTranslate2 picks here (or CT2_USE_MKL); both: once with MKL, once oneDNN")
    args = parser.parse_args()
    if args.int8_paths == "both":
        argv = [a for a in sys.argv[1:] if not a.startswith("--int8-paths") and a != "both"]
        for flag in ("1", "0"):
            subprocess.run([sys.executable, os.path.abspath(__file__), *argv], env={**os.environ, "CT2_USE_MKL": flag},
                           check=True)
        return
    from llm_blueprint.engine.cpu_backend import int8_gemm_backend
    concurrency = [int(c) for c in args.concurrency.split(",")]
    tokens = args.tokens or (32 if args.quick else 128)
    tokens_1b = args.tokens_1b or (32 if args.quick else 64)
    rounds = args.rounds or (1 if args.quick else 2)
    per_client = 1 if args.quick else args.per_client
    log_dir = tempfile.mkdtemp(prefix="bench-peer-")
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    path = f"int8 on {int8_gemm_backend()} (CT2_USE_MKL={os.environ.get('CT2_USE_MKL', 'unset')})"
    print(f"{cpu}, {os.cpu_count()} cores, {path}; llama.cpp {binaries()['llama-server']}; logs in {log_dir}", flush=True)
    started = time.monotonic()
    results = {}
    for model in args.models.split(","):
        results[model] = bench_model(model, concurrency, tokens_1b if model == "1b" else tokens, rounds, per_client,
                                     log_dir)
    for model, result in results.items():
        report(model, result, concurrency)
    print(f"\ntotal {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
