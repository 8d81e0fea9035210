"""What real top_logprobs cost: one greedy completion with and without alternatives, alternating, same engine.

    python bench/top_logprobs.py [--tokens 64] [--rounds 5] [--batch 1]

``top_logprobs`` reads the whole vocabulary's logits of every step (CTranslate2's
``return_logits_vocab``) and takes a log-softmax and the k best per token; it is
done only for requests that ask. Prints tokens/s both ways and the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()

    from llm_blueprint.engine import Model, ModelOptions
    from llm_blueprint.engine.default_model import prepare_default_model
    from llm_blueprint.engine.generation import Engine
    from llm_blueprint.events import GenerationRequest, collect

    model = Model(prepare_default_model(os.environ.get("LLM_CACHE_DIR") or None), ModelOptions(device="cpu", inter_threads=1,
                                                                                               intra_threads=os.cpu_count() or 1))
    engine = Engine(model)
    ids = model.encode_chat([{"role": "user", "content": "Write a long story about the sea."}])
    timings: dict[str, float] = {"plain": 0.0, "top_logprobs=5": 0.0}
    try:
        for r in range(args.rounds + 1):
            for name in (timings if r % 2 == 0 else reversed(timings)):
                top = 5 if name != "plain" else 0
                request = GenerationRequest(ids, args.tokens, min_tokens=args.tokens, temperature=0, n=args.batch,
                                            logprobs=bool(top), top_logprobs=top)
                started = time.perf_counter()
                collect(engine.generate(request), args.batch)
                if r:  # the first round warms up
                    timings[name] += time.perf_counter() - started
    finally:
        engine.shutdown()
        model.close()
    rates = {name: args.rounds * args.tokens * args.batch / seconds for name, seconds in timings.items()}
    for name, rate in rates.items():
        print(f"{name:>15}: {rate:7.1f} tokens/s")
    print(f"top_logprobs / plain: {rates['top_logprobs=5'] / rates['plain']:.2f}")


if __name__ == "__main__":
    main()
