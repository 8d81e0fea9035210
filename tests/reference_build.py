"""Run inside the reference environment (torch, transformers, llama.cpp's converter), never by pytest itself.

For each job of the JSON file given as the first argument it writes what the
upstream tools write, and what they compute, for llm-blueprint to be checked
against (``tests/reference_env.py`` makes the environment and the jobs):

- ``hf/``: a random-weight model built by transformers from the job's config
  (``AutoModelForCausalLM.from_config``, seeded) and saved by
  ``save_pretrained`` in the job's dtype, with the tokenizer loaded by
  ``AutoTokenizer`` from the job's tokenizer files and saved by its own
  ``save_pretrained``;
- ``model-<outtype>.gguf``: that folder converted by llama.cpp's own
  ``convert_hf_to_gguf.py``, once per GGUF outtype;
- ``reference.json`` and ``logits.npy``: the float32 logits of the saved
  model (reloaded from its files) for the job's ids (``logits-<variant>.npy``:
  with the job's config changes of that variant), the tokenizer's ids for
  the job's texts, its chat template rendered on the job's messages, and the
  ids of the end-of-turn tokens.

Nothing here imports llm_blueprint: the oracle is independent of the code under test.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that every part of the model moves the logits (transformers' init is near zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim == 1 and "norm" in name:  # around transformers' own init (1, or 0 for Gemma's 1 + w)
                p.add_(0.1 * noise)
            elif p.ndim == 1:  # biases, scalars
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):  # Gemma 4's scale of each layer's output (saved, initialised to 1)
                b.copy_(0.5 + torch.rand(b.shape, generator=generator))


def processor_template(folder: str) -> str | None:
    """A ``chat_template.json`` (the processors' file, which tokenizers do not read itself) given explicitly."""
    path = os.path.join(folder, "chat_template.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)["chat_template"]


def build(job: dict, converter: str) -> None:
    out = job["out"]
    folder = os.path.join(out, "hf")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(folder)
    config = AutoConfig.for_model(job["model_type"], **job["config"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, job.get("seed", 0))
    model.to(DTYPES[job["dtype"]]).save_pretrained(folder)
    del model

    for name in os.listdir(job["tokenizer"]):  # the tokenizer files as written, then as transformers saves them
        shutil.copy(os.path.join(job["tokenizer"], name), folder)
    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer"])
    tokenizer.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)

    for outtype in job["gguf"]:
        result = subprocess.run(
            [sys.executable, __file__, "--convert", job.get("bpe_pre", ""), converter, folder,
             "--outfile", os.path.join(out, f"model-{outtype}.gguf"), "--outtype", outtype],
            capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"convert_hf_to_gguf.py failed on {job['name']} ({outtype}):\n{result.stderr[-4000:]}")

    for variant, changes in {None: {}, **job.get("variants", {})}.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                     **changes).eval()
        with torch.no_grad():
            logits = model(torch.tensor([job["ids"]])).logits[0].float().numpy()
        np.save(os.path.join(out, f"logits-{variant}.npy" if variant else "logits.npy"), logits)
    reference = {
        "text_ids": [tokenizer(text)["input_ids"] for text in job["texts"]],
        "decoded": [tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) for text in job["texts"]],
        "chat": tokenizer.apply_chat_template(job["messages"], tokenize=False, add_generation_prompt=True,
                                              chat_template=processor_template(folder)),
        "end_ids": [tokenizer.convert_tokens_to_ids(t) for t in job["end_tokens"]],
        "config": json.load(open(os.path.join(folder, "config.json"), encoding="utf-8")),
    }
    with open(os.path.join(out, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(reference, f, indent=1)


def convert(bpe_pre: str, converter: str, args: list[str]) -> None:
    """llama.cpp's converter as its command line runs it. It names a byte-level BPE tokenizer's pre-tokenizer by
    hashing how the tokenizer splits a fixed text, a hash only the real tokenizers give; the tiny ones, trained
    here with the real split rules, are named what the real one is (``bpe_pre``: "llama-bpe", "qwen2"...)."""
    import runpy

    sys.path.insert(0, os.path.dirname(converter))
    if bpe_pre:
        from conversion import base

        base.TextModel.get_vocab_base_pre = lambda self, tokenizer: bpe_pre
    sys.argv = [converter, *args]
    runpy.run_path(converter, run_name="__main__")


def main() -> None:
    if sys.argv[1] == "--convert":
        convert(sys.argv[2], sys.argv[3], sys.argv[4:])
        return
    jobs_path, converter = sys.argv[1], sys.argv[2]
    with open(jobs_path, encoding="utf-8") as f:
        jobs = json.load(f)
    torch.set_num_threads(1)
    for job in jobs:
        build(job, converter)
        print(f"built {job['name']}", flush=True)


if __name__ == "__main__":
    main()
