"""How often the default model's answers end in a loop under candidate default sampling settings (issue #30).

    python bench/loop_defaults.py [--samples 2] [--budget 512] [--cache DIR]

Every prompt of EVERYDAY (48 ordinary requests: facts, arithmetic, how-tos, short writing) is answered ``--samples``
times (unseeded: seeded requests run alone) by the embedded SmolLM2-135M-Instruct (int8, the server's engine and batching) under each
candidate. An answer *loops* when it runs to the budget and its last 128 tokens repeat themselves (at most half of
their 8-token windows are distinct). Printed per candidate: the loop rate, the median answer length of the answers
that did not loop, how many factual answers name the expected fact, and the tokens spent in all.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from llm_blueprint.engine import Model, ModelOptions  # noqa: E402
from llm_blueprint.engine.default_model import prepare_default_model  # noqa: E402
from llm_blueprint.engine.generation import BatchingOptions, Engine  # noqa: E402
from llm_blueprint.events import Finish, GenerationRequest, TextDelta  # noqa: E402

# (prompt, a word a right answer contains, or None)
EVERYDAY = [
    ("What is the capital of France?", "Paris"), ("What is 2+2?", "4"), ("What is the capital of Japan?", "Tokyo"),
    ("How many days are in a week?", "seven|7"), ("What colour is the sky on a clear day?", "blue"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"), ("What is the boiling point of water in Celsius?", "100"),
    ("What is 10 times 5?", "50"), ("Which planet is known as the Red Planet?", "Mars"),
    ("What language is spoken in Brazil?", "Portuguese"), ("How many legs does a spider have?", "eight|8"),
    ("What is the largest ocean on Earth?", "Pacific"), ("What is the chemical symbol for water?", "H2O|H₂O"),
    ("What is the opposite of hot?", "cold"), ("What is the capital of Italy?", "Rome"),
    ("How many hours are in a day?", "24"),
    ("Write a haiku about autumn.", None), ("Write a haiku about the sea.", None),
    ("Write a short poem about a cat.", None), ("Write a two-line rhyme about rain.", None),
    ("Tell me a joke.", None), ("Write a limerick about a programmer.", None),
    ("Give me three tips for better sleep.", None), ("How do I boil an egg?", None),
    ("How do I make a cup of tea?", None), ("What should I pack for a weekend trip?", None),
    ("Explain what a computer is to a child.", None), ("Why do leaves change colour in autumn?", None),
    ("What is photosynthesis?", None), ("Explain gravity in one paragraph.", None),
    ("What are the benefits of exercise?", None), ("How can I save money on groceries?", None),
    ("Write a short thank-you note to a colleague.", None), ("Write an email asking for a day off.", None),
    ("Summarise the story of Cinderella in three sentences.", None), ("Describe a sunset.", None),
    ("Suggest a name for a pet goldfish.", None), ("What is a good breakfast?", None),
    ("How do plants grow?", None), ("What is the difference between weather and climate?", None),
    ("Give me a recipe for a simple salad.", None), ("How do I learn to ride a bike?", None),
    ("Write a sentence using the word 'gentle'.", None), ("What is the meaning of life?", None),
    ("List five fruits.", None), ("Translate 'good morning' into French.", "Bonjour"),
    ("What is the weather like in spring?", None), ("Describe your ideal holiday.", None),
]

CANDIDATES = [  # (name, sampling), the rest from RECOMMENDED_SAMPLING's temperature 0.2, top_p 0.9
    ("model card (t 0.2, top_p 0.9)", dict(temperature=0.2, top_p=0.9)),
    ("+ repetition_penalty 1.05", dict(temperature=0.2, top_p=0.9, repetition_penalty=1.05)),
    ("+ repetition_penalty 1.1 (Ollama's)", dict(temperature=0.2, top_p=0.9, repetition_penalty=1.1)),
    ("+ repetition_penalty 1.2", dict(temperature=0.2, top_p=0.9, repetition_penalty=1.2)),
    ("t 0.7, top_p 0.9", dict(temperature=0.7, top_p=0.9)),
    ("t 0.7, top_p 0.9, repetition_penalty 1.1", dict(temperature=0.7, top_p=0.9, repetition_penalty=1.1)),
]


def looped(tokens: list[int], finish: str, budget: int) -> bool:
    if finish != "length" or len(tokens) < budget:
        return False
    tail = tokens[-128:]
    windows = [tuple(tail[i:i + 8]) for i in range(len(tail) - 7)]
    return len(set(windows)) <= len(windows) / 2


def answer(engine: Engine, ids: list[int], budget: int, seed: int, sampling: dict) -> tuple[list[int], str]:
    tokens, finish = [], "stop"
    for event in engine.generate(GenerationRequest(ids, budget, logprobs=True, **sampling)):  # unseeded: batched
        if isinstance(event, TextDelta):
            tokens += [t.token_id for t in event.logprobs]
        elif isinstance(event, Finish):
            finish = event.reason
            break
    return tokens, finish


def run_all(engine: Engine, jobs: list, budget: int, sampling: dict, clients: int) -> list:
    """Answer every job from ``clients`` threads at once (the server's batching sees a steady load)."""
    results, lock = [], threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if not jobs:
                    return
                ids, q, fact, seed = jobs.pop()
            tokens, finish = answer(engine, ids, budget, seed, sampling)
            with lock:
                results.append((q, fact, tokens, finish))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--cache", default=os.environ.get("LLM_TEST_CACHE") or tempfile.mkdtemp(prefix="loops-"))
    args = parser.parse_args()
    model = Model(prepare_default_model(args.cache), ModelOptions(device="cpu", compute_type="int8", inter_threads=2,
                                                                   intra_threads=1))
    engine = Engine(model, batching=BatchingOptions(max_batch_size=16))
    prompts = [(model.encode_chat([{"role": "user", "content": q}]), q, fact) for q, fact in EVERYDAY]
    print(f"{len(EVERYDAY)} prompts x {args.samples} samples, budget {args.budget} tokens, SmolLM2-135M-Instruct int8")
    print(f"{'candidate':42} {'loops':>9} {'median tokens':>13} {'facts right':>11} {'tokens':>7} {'seconds':>7}")
    try:
        for name, sampling in CANDIDATES:
            jobs = [(ids, q, fact, seed) for ids, q, fact in prompts for seed in range(args.samples)]
            started = time.monotonic()
            results = run_all(engine, jobs, args.budget, sampling, args.clients)
            elapsed = time.monotonic() - started
            loops = [r for r in results if looped(r[2], r[3], args.budget)]
            lengths = [len(r[2]) for r in results if r not in loops]
            facts = [(fact, model.tokenizer.decode(tokens)) for _, fact, tokens, _ in results if fact]
            right = sum(any(word.lower() in text.lower() for word in fact.split("|")) for fact, text in facts)
            print(f"{name:42} {len(loops):>3}/{len(results):<3} {100 * len(loops) / len(results):3.0f}% "
                  f"{statistics.median(lengths):>6.0f} {right:>7}/{len(facts):<3} {sum(len(r[2]) for r in results):>7} "
                  f"{elapsed:>7.0f}")
            for q, _, tokens, _ in loops[:2]:
                print(f"    loop: {q!r} -> ...{model.tokenizer.decode(tokens[-40:])!r}")
    finally:
        engine.shutdown()
        model.close()


if __name__ == "__main__":
    main()
