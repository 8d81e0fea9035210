"""Embeddings throughput: this server against llama-server, on the same weights, on one machine.

    python bench/embeddings.py [--concurrency 1 16] [--seconds 20] [--layouts 1x2 2x1] [--no-peer] [--llama-server PATH]

The model has bge-small-en-v1.5's shape (BERT: 12 layers, hidden 384, 12 heads, FFN 1536, 30,522 tokens, 512
positions; 33M parameters) with random weights and a WordPiece vocabulary of whole words made here, written as
a Hugging Face folder (sentence-transformers files: mean pooling, normalised). Every text is 62 vocabulary words,
64 tokens with [CLS] and [SEP] (checked on each server's ``usage.prompt_tokens``).

1. the raw engine: ``EncoderModel.forward`` + pooling on batches of c texts, no HTTP (the limit);
2. this server under ``gunicorn -k gevent`` (``wsgi:app``, the folder in ``LLM_MODELS``, converted to int8 on
   first use), c clients in a closed loop, one text per request;
3. llama-server (``--embeddings --pooling mean``) on the same weights written as GGUF the way llama.cpp's
   ``convert_hf_to_gguf.py`` writes BERT (Q8_0, the nearest to int8), same clients. Its binary: ``--llama-server``,
   ``$LLAMA_SERVER`` or ``~/.cache/llm-blueprint/llama.cpp-0.3.36/bin/llama-server``; skipped when absent.

Both servers get the same threads (``--threads``, default all cores) and ``OMP_WAIT_POLICY=PASSIVE`` (see below). Also
printed: the cosine between the two
servers' vectors for the same texts (int8 against Q8_0: a check that both run the same model).
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

import numpy as np
import requests

# As the shipped gunicorn settings run the server (gunicorn_conf.py), for the raw engine and llama-server too: with
# OpenMP's default spin-waiting, 2 threads on a 2-core machine that has any other load collapse (measured here:
# llama-server 0.5 texts/s spinning, 17.8 passive, same model and machine minutes apart).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from throughput import free_port, percentile, stop, wait_ready  # noqa: E402

DEFAULT_LLAMA_SERVER = os.path.expanduser("~/.cache/llm-blueprint/llama.cpp-0.3.36/bin/llama-server")
SPECIALS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}  # where bert-base-uncased has them
VOCAB, WORDS_PER_TEXT = 30522, 62


def bench_tokenizer() -> str:
    """A WordPiece tokenizer.json: BERT's specials at their usual ids, [unusedN], then whole words ``w<i>``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {}
    for i in range(VOCAB):
        vocab[next((t for t, j in SPECIALS.items() if j == i), None) or (f"[unused{i}]" if i < 104 else f"w{i}")] = i
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 101), ("[SEP]", 102)])
    tok.decoder = decoders.WordPiece()
    return tok.to_str()


def bge_small_shape():
    from tiny_encoders import TinyEncoder

    return TinyEncoder("bge-small-shape", "bert", pooling="mean", normalize=True, hidden=384, layers=12, heads=12,
                       ffn=1536, positions=512, extra_vocab=0, tokenizer_text=bench_tokenizer())


def texts(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in rng.integers(104, VOCAB, WORDS_PER_TEXT)) for _ in range(count)]


# ----------------------------------------------------------------------------- 1. raw engine
def bench_raw(model_dir: str, concurrencies: list[int], seconds: float, threads: int) -> dict[int, float]:
    from llm_blueprint.engine.encoder import EncoderModel, EncoderOptions

    model = EncoderModel(model_dir, EncoderOptions(device="cpu", intra_threads=threads))
    pool = texts(256, seed=1)
    results = {}
    for c in concurrencies:
        inputs = model.encode_texts(pool[:c], None, "input")
        model.forward(inputs)  # warm-up
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 2:
            states = model.forward(inputs)
            _ = [model.pool(states[k, : len(item.ids)]) for k, item in enumerate(inputs)]
            done += len(inputs)
        results[c] = done / (time.perf_counter() - started)
    model.close()
    return results


# ----------------------------------------------------------------------------- HTTP
def drive(url: str, model: str, concurrency: int, seconds: float) -> dict[str, float]:
    """c clients in a closed loop for ``seconds``, one 64-token text per request: texts/s and latency."""
    pool = texts(512, seed=2)
    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    stop_at = time.perf_counter() + seconds
    lock = threading.Lock()

    def client(k: int) -> None:
        session = requests.Session()
        i = k
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            response = session.post(url, json={"model": model, "input": pool[i % len(pool)]}, timeout=120)
            elapsed = time.perf_counter() - started
            i += concurrency
            with lock:
                if response.status_code != 200:
                    errors.append(response.text[:200])
                    return
                latencies.append(elapsed)
                tokens.append(response.json()["usage"]["prompt_tokens"])

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{url}: {errors[0]}")
    return {"texts_per_s": len(latencies) / elapsed, "p50_ms": 1000 * percentile(latencies, 0.5),
            "p95_ms": 1000 * percentile(latencies, 0.95), "tokens_per_text": float(np.mean(tokens)), "requests": len(latencies)}


def vectors(url: str, model: str, batch: list[str]) -> np.ndarray:
    response = requests.post(url, json={"model": model, "input": batch}, timeout=120)
    response.raise_for_status()
    return np.array([d["embedding"] for d in sorted(response.json()["data"], key=lambda d: d["index"])])


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its children (gunicorn's workers)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    total = 0.0
    for p in [str(pid), *children]:
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
        except (OSError, StopIteration):
            pass
    return total


def bench_ours(folder: str, work: str, replicas: int, threads: int, args) -> tuple[np.ndarray, dict]:
    """This server with the model as ``replicas`` x ``threads``: (its vectors of the check texts, figures by c)."""
    port = free_port()
    models = {"bge": {"path": folder, "replicas": replicas, "threads": threads}}
    env = {**os.environ, "LLM_MODELS": json.dumps(models), "LLM_CACHE_DIR": os.path.join(work, "cache"),
           "LLM_BIND": f"127.0.0.1:{port}", "LLM_EAGER_LOAD": "0", "LLM_WORKERS": "1"}
    log = open(os.path.join(work, f"server-{replicas}x{threads}.log"), "w")
    server = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", os.path.join(ROOT, "gunicorn.conf.py"), "wsgi:app"],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1/embeddings"
    figures: dict = {}
    try:
        wait_ready(f"http://127.0.0.1:{port}/healthz", server)
        started = time.perf_counter()
        check = vectors(url, "bge", texts(8, seed=3))  # converts (once) and loads the model
        print(f"ours {replicas}x{threads}: first request (conversion to int8, once, + load) {time.perf_counter() - started:.1f} s")
        for c in args.concurrency:
            drive(url, "bge", c, 2)  # warm-up at this concurrency
            figures[c] = result = drive(url, "bge", c, args.seconds)
            print(f"ours {replicas}x{threads}    c={c:<3d} {result['texts_per_s']:8.1f} texts/s  p50 {result['p50_ms']:6.1f} ms  "
                  f"p95 {result['p95_ms']:6.1f} ms  ({result['tokens_per_text']:.0f} tokens/text)")
        figures["rss_mb"] = rss_mb(server.pid)
        print(f"ours {replicas}x{threads}: server RSS {figures['rss_mb']:.0f} MB (master + worker)")
    finally:
        stop(server)
        log.close()
    return check, figures


def bench_peer(args, gguf_path: str, slots: int, work: str, ours_vectors: np.ndarray) -> dict:
    """llama-server with ``slots`` parallel slots of 64 tokens each (a larger context makes every batched sequence
    attend over it: slower)."""
    port = free_port()
    log = open(os.path.join(work, f"llama-server-np{slots}.log"), "w")
    peer = subprocess.Popen([args.llama_server, "-m", gguf_path, "--embeddings", "--pooling", "mean", "--host", "127.0.0.1",
                             "--port", str(port), "-np", str(slots), "-c", str(slots * 64), "-t", str(args.threads),
                             "-tb", str(args.threads)], stdout=log, stderr=subprocess.STDOUT, env=os.environ)
    url = f"http://127.0.0.1:{port}/v1/embeddings"
    figures: dict = {}
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", peer)
        theirs = vectors(url, "bge", texts(8, seed=3))
        cosines = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(ours_vectors, theirs, strict=True)]
        figures["cosine_vs_ours_min"] = min(cosines)
        print(f"llama-server {args.peer_type} -np {slots}: RSS {rss_mb(peer.pid):.0f} MB; cosine of its vectors and ours "
              f"(int8): min {min(cosines):.5f}")
        for c in args.concurrency:
            drive(url, "bge", c, 2)
            figures[c] = result = drive(url, "bge", c, args.seconds)
            print(f"llama-server -np {slots:<2d} c={c:<3d} {result['texts_per_s']:8.1f} texts/s  p50 {result['p50_ms']:6.1f} ms  "
                  f"p95 {result['p95_ms']:6.1f} ms  ({result['tokens_per_text']:.0f} tokens/text)")
    finally:
        stop(peer)
        log.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=20.0, help="per concurrency level and server")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER", DEFAULT_LLAMA_SERVER))
    parser.add_argument("--peer-type", default="Q8_0", choices=["Q8_0", "F16", "F32"])
    parser.add_argument("--layouts", nargs="+", default=["1x2"],
                        help="this server's engine layouts to measure, replicas x threads (e.g. 1x2 2x1)")
    parser.add_argument("--peer-slots", type=int, nargs="+", default=[4, 16], help="llama-server -np values to measure")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    from tiny_encoders import build, write_bert_gguf

    work = tempfile.mkdtemp(prefix="bench-embeddings-")
    tiny = bge_small_shape()
    folder = os.path.join(work, "bge-small-shape")
    weights = build(tiny, folder)
    params = sum(w.size for n, w in weights.items() if not n.startswith("pooler."))
    print(f"model: bge-small shape, {params / 1e6:.1f}M parameters (random weights), {args.threads} thread(s), "
          f"load average {os.getloadavg()[0]:.2f}")
    figures: dict = {"parameters": params, "threads": args.threads, "concurrency": args.concurrency}

    # 2. this server (first: it converts the folder, which the raw figures then reuse), per engine layout
    figures["ours"] = {}
    ours_vectors = None
    for layout in args.layouts:
        replicas, threads = (int(x) for x in layout.split("x"))
        vectors_here, figures["ours"][layout] = bench_ours(folder, work, replicas, threads, args)
        ours_vectors = vectors_here if ours_vectors is None else ours_vectors
    converted = next(os.path.join(work, "cache", d) for d in os.listdir(os.path.join(work, "cache"))
                     if os.path.isfile(os.path.join(work, "cache", d, "model.bin")))
    figures["model_bin_mb"] = os.path.getsize(os.path.join(converted, "model.bin")) / 2**20

    # 1. raw engine
    figures["raw"] = bench_raw(converted, args.concurrency, args.seconds, args.threads)
    for c, rate in figures["raw"].items():
        print(f"raw engine  batch={c:<3d} {rate:8.1f} texts/s")

    # 3. llama-server
    if args.no_peer or not os.path.isfile(args.llama_server):
        print(f"peer: not run ({'--no-peer' if args.no_peer else 'no llama-server at ' + args.llama_server})")
    else:
        gguf_path = write_bert_gguf(tiny, weights, os.path.join(work, f"bge-small-shape-{args.peer_type}.gguf"), args.peer_type)
        figures["peer"] = {}
        for slots in args.peer_slots:
            figures["peer"][slots] = bench_peer(args, gguf_path, slots, work, ours_vectors)
        for layout, ours in figures["ours"].items():
            for c in args.concurrency:
                best = max(peer[c]["texts_per_s"] for peer in figures["peer"].values())
                print(f"ratio ours {layout} / llama-server's best at c={c}: {ours[c]['texts_per_s'] / best:.2f}")
    print(f"model.bin (int8): {figures['model_bin_mb']:.1f} MB; logs in {work}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
