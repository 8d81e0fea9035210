"""Peak memory of a conversion: a 1B model of Llama-3.2-1B's shape, from bf16 safetensors and from F16 GGUF.

    python bench/convert_memory.py [--dir DIR] [--vocab 128256] [--quantization int8]

Random weights (16 layers, hidden 2048, 32 heads, 8 KV heads, FFN 8192,
llama3 rope scaling, tied embeddings) are written once as a Hugging Face
folder (bfloat16, one shard per four layers, with an index) and as the GGUF
F16 file llama.cpp's converter would write; each is then converted in a fresh
process that reports its own peak resident memory (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE, os.path.join(ROOT, "tests")]

import tiny_models as tm  # noqa: E402
from llama_1b import FFN, HEADS, HIDDEN, KV_HEADS, LAYERS, tensor, tensor_shapes, write_f16_tensors  # noqa: E402

CHILD = """
import json, resource, sys, time
from llm_blueprint.convert import convert_model
start = time.time()
convert_model(sys.argv[1], sys.argv[2], quantization=sys.argv[3], force=True, show_progress=False)
print(json.dumps({"seconds": time.time() - start,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def model_description(vocab: int) -> tm.Tiny:
    config = tm._base("llama", "LlamaForCausalLM", hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS,
                      rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
                      rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    base = tm.FAMILIES["llama3"]
    tokens = len(tm.tokenizer_tokens(base))
    return tm.Tiny("llama-1b-shape", config, "llama3", base.template, "tokenizer_config", base.terminator,
                   base.special_tokens, base.generation_eos, extra_vocab=vocab - tokens, gguf_ftype="F16")


def write_sources(tiny: tm.Tiny, vocab: int, folder: str, gguf_path: str) -> None:
    shapes = tensor_shapes(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(tm.full_config(tiny), f, indent=2)
    tm.write_tokenizer_files(tiny, folder)
    groups: dict[str, list[str]] = {}
    for name in shapes:
        layer = int(name.split(".")[2]) // 4 if name.startswith("model.layers.") else -1
        groups.setdefault(f"model-{layer + 2:05d}-of-00005.safetensors", []).append(name)
    weight_map = {}
    for shard, names in groups.items():
        tm._write_safetensors(os.path.join(folder, shard), {n: tensor(n, shapes[n]) for n in names}, "bfloat16")
        weight_map.update({n: shard for n in names})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)

    # GGUF F16, streamed (the Llama 3 rope scaling as llama.cpp's converter writes it: a rope_freqs tensor)
    writer = tm.gguf_writer(tiny, gguf_path, folder)
    write_f16_tensors(writer, vocab, tm.extra_tensors(tiny, tm.full_config(tiny)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/llm-convert-memory")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--quantization", default="int8")
    args = parser.parse_args()
    tiny = model_description(args.vocab)
    folder, gguf_path = os.path.join(args.dir, "hf-bf16"), os.path.join(args.dir, "model-f16.gguf")
    if not os.path.isfile(gguf_path):
        start = time.time()
        write_sources(tiny, args.vocab, folder, gguf_path)
        print(f"wrote the sources in {time.time() - start:.0f}s")
    params = sum(int(np.prod(s)) for s in tensor_shapes(args.vocab).values())
    biggest = max(int(np.prod(s)) for s in tensor_shapes(args.vocab).values())
    print(f"{params / 1e9:.2f}B parameters; largest tensor {biggest * 4 / 2**30:.2f} GiB as float32")
    for label, source in (("safetensors bf16", folder), ("GGUF F16", gguf_path)):
        out = os.path.join(args.dir, f"ct2-{label.split()[0].lower()}-{args.quantization}")
        env = {**os.environ, "PYTHONPATH": ROOT}
        proc = subprocess.run([sys.executable, "-c", CHILD, source, out, args.quantization],
                              capture_output=True, text=True, env=env, check=True)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        size = os.path.getsize(os.path.join(out, "model.bin"))
        print(f"{label:17s} -> {args.quantization}: peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB, "
              f"model.bin {size / 2**30:.2f} GiB, {result['seconds']:.0f}s "
              f"(peak = {result['peak_rss_bytes'] / size:.2f} x model.bin)")


if __name__ == "__main__":
    main()
