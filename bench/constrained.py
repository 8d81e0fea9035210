"""What token-level constraints cost: time per constrained answer vs an unconstrained answer of the same length.

    python bench/constrained.py [--rounds 3]

In-process, on the engine (no HTTP), the default model in the server's own thread layout, one request at a
time. For each case (JSON answers to a few schemas, a forced tool call's
arguments; greedy and temperature 1.0) it runs the constrained request as the
chat pipeline builds it, notes its token count and the number of resumes
(the model sampled a token the grammar forbids: the entry stopped and resumed
with an allowed one, re-prefilling prompt + answer), then an unconstrained
request on the same prompt forced to the same token count (min_tokens =
max_tokens). Rounds alternate the order. Prints per case: tokens, resumes,
seconds constrained / unconstrained and their ratio; then the unconstrained
path's own speed with and without ``return_logits_vocab`` (what a logits copy
per token would cost it: the engine asks for it only in constrained batches).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the server's gunicorn settings do

CITY = {"type": "object", "required": ["city", "country", "population"], "properties": {
    "city": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30},
    "population": {"type": "integer", "minimum": 0}}}
PLANETS = {"type": "object", "required": ["planets"], "properties": {"planets": {
    "type": "array", "minItems": 2, "maxItems": 3, "items": {"type": "object", "required": ["name", "order"], "properties": {
        "name": {"type": "string", "maxLength": 20}, "order": {"type": "integer", "minimum": 1, "maximum": 8}}}}}}
ANSWER = {"type": "object", "required": ["answer", "confidence"], "properties": {
    "answer": {"enum": ["yes", "no"]}, "confidence": {"type": "integer", "minimum": 1, "maximum": 5}}}
BOOKING = {"type": "object", "required": ["guest", "nights", "room"], "properties": {
    "guest": {"type": "string", "maxLength": 30}, "nights": {"type": "integer", "minimum": 1, "maximum": 14},
    "room": {"enum": ["single", "double", "suite"]}}}
CASES = [
    ("json city", "Describe Paris.", CITY, None),
    ("json planets", "Name some planets and their order from the sun.", PLANETS, None),
    ("json yes/no (unprompted shape)", "Is the sky blue?", ANSWER, None),
    ("forced call", "Book a double room for two nights for Ann.", BOOKING, "book_room"),
]


def build(model, engine, question: str, schema: dict, tool: str | None, temperature: float, max_tokens: int):
    """The constrained GenerationRequest exactly as the chat pipeline makes it."""
    from llm_blueprint.chat.conversation import ChatRequest, Message, ResponseFormat, Tool, ToolChoice
    from llm_blueprint.chat.pipeline import ChatStream
    from llm_blueprint.chat.prompt import render
    from llm_blueprint.events import GenerationRequest

    if tool:
        chat = ChatRequest([Message("user", question)], [Tool(tool, "", schema)], ToolChoice("required", tool))
    else:
        chat = ChatRequest([Message("user", question)], response_format=ResponseFormat("json_schema", schema))
    prompt = render(model, chat, cache_points=True)  # as the server does with its prompt cache on (the default)
    captured = []

    class Capturing:  # the engine as the chat pipeline's service, keeping the request it is given
        model = engine.model
        validate, warm, score_continuations = engine.validate, engine.warm, engine.score_continuations

        def generate(self, request):
            captured.append(request)
            return engine.generate(request)

    stream = ChatStream(Capturing(), chat, prompt, GenerationRequest(
        prompt.ids, max_tokens, temperature=temperature, cache_points=prompt.cache_points, cache_marks=prompt.cache_marks))
    stream.close()
    return captured[0]


def timed(engine, request) -> tuple[float, int, str]:
    from llm_blueprint.events import collect

    start = time.perf_counter()
    texts, finishes, done, _ = collect(engine.generate(request), 1)
    return time.perf_counter() - start, finishes[0].completion_tokens, finishes[0].reason


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=120)
    args = parser.parse_args()

    import dataclasses

    from llm_blueprint.convert.model_cache import default_cache_dir
    from llm_blueprint.engine import Model, ModelOptions
    from llm_blueprint.engine.default_model import prepare_default_model
    from llm_blueprint.engine.generation import BatchingOptions, Engine
    from llm_blueprint.engine.layout import choose
    from llm_blueprint.engine.prompt_cache import PromptCache, state_bytes_per_token

    model_dir = prepare_default_model(os.environ.get("LLM_CACHE_DIR") or None)
    # The server's own thread layout (measured once and cached, as at the server's start): a resume's cost is a
    # short prefill, and how fast that runs depends on the layout (1 x 2 prefills 18 tokens 5x slower than 2 x 1
    # on the 2-core Intel VM).
    layout = choose(model_dir, "cpu", "int8", os.environ.get("LLM_CACHE_DIR") or default_cache_dir())
    model = Model(model_dir, ModelOptions(device="cpu", inter_threads=layout.inter_threads,
                                           intra_threads=layout.intra_threads))
    # The server's default prompt cache: a resume then re-prefills only what follows the held system prompt.
    cache = PromptCache(state_bytes_per_token(model_dir, "cpu"), 2048 * 2**20, weights_bytes=model.weights_bytes)
    engine = Engine(model, batching=BatchingOptions(gather_seconds=0), prompt_cache=cache)
    print(f"model {model_dir}, {os.cpu_count()} cores, layout {layout.inter_threads} x {layout.intra_threads} "
          f"({layout.how}), {args.rounds} rounds, one request at a time", flush=True)
    rows = []
    try:
        for name, question, schema, tool in CASES:
            for temperature in (0.0, 1.0):
                constrained_s, free_s, resumes, tokens = [], [], [], []
                for r in range(args.rounds):
                    request = build(model, engine, question, schema, tool, temperature, args.max_tokens)
                    if r % 2:  # alternate which runs first, so machine noise hits both alike
                        timed(engine, dataclasses.replace(request, constraint=None, max_tokens=40, min_tokens=40))
                    before = engine.resumes
                    seconds, count, reason = timed(engine, request)
                    resumes.append(engine.resumes - before)
                    free_s.append(timed(engine, dataclasses.replace(request, constraint=None, max_tokens=count,
                                                                    min_tokens=count))[0])
                    constrained_s.append(seconds)
                    tokens.append(count)
                row = (name, temperature, statistics.mean(tokens), statistics.mean(resumes), statistics.median(constrained_s),
                       statistics.median(free_s))
                rows.append(row)
                print(f"{name:32} t={temperature:.1f} tokens {row[2]:5.1f} resumes {row[3]:4.1f} constrained {row[4]:.3f}s "
                      f"unconstrained {row[5]:.3f}s ratio {row[4] / row[5]:.2f} ({reason})", flush=True)

        ids = model.encode_chat([{"role": "user", "content": "Tell me a story about a lighthouse."}])
        raw = model.tokenizer.ids_to_tokens(ids)
        speeds = {}
        for logits in (False, True, False, True):
            start = time.perf_counter()
            model.generator.generate_batch([raw] * 4, max_length=96, min_length=96, include_prompt_in_result=False,
                                           sampling_topk=1, return_logits_vocab=logits, callback=lambda step: False)
            speeds.setdefault(logits, []).append(4 * 96 / (time.perf_counter() - start))
    finally:
        engine.shutdown()
    print(f"\n{'case':32} {'t':>4} {'tokens':>7} {'resumes':>8} {'constr. s':>10} {'free s':>8} {'ratio':>6}")
    for name, temperature, tokens, resumes, c, f in rows:
        print(f"{name:32} {temperature:4.1f} {tokens:7.1f} {resumes:8.1f} {c:10.3f} {f:8.3f} {c / f:6.2f}")
    print(f"\nunconstrained batch of 4 x 96 tokens: {max(speeds[False]):.1f} tok/s without the logits copy, "
          f"{max(speeds[True]):.1f} tok/s with return_logits_vocab (the engine asks for it only for constrained entries)")


if __name__ == "__main__":
    main()
