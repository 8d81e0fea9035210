"""Scoring passes: the model's log-probabilities of given tokens, off the event loop (no sampling, no batching)."""

from __future__ import annotations

import numpy as np

from ..events import TokenLogprob
from .completion import top_logprobs
from .handoff import run_on_native_thread
from .model import Model


def score_continuations(model: Model, prompt_ids: list[int], continuations: list[list[int]]) -> list[float]:
    """Log-probability of each continuation after the prompt (one engine pass).

    Lets a caller choose among a few fixed alternatives (a tool name, say) by
    the model's own likelihood: CTranslate2 has no logits hook to constrain
    sampling.
    """
    vocabulary = model.vocabulary
    batch = [[vocabulary[t] for t in prompt_ids + list(c)] for c in continuations]
    result = run_on_native_thread(lambda: model.generator.score_batch(batch), "llm-engine-score")
    # log_probs[i] scores token i + 1 given the tokens before it.
    first = len(prompt_ids) - 1
    return [sum(r.log_probs[first:]) for r in result]


def prompt_logprobs(model: Model, prompt_ids: list[int], top: int = 0) -> list[TokenLogprob]:
    """The model's log-probability of each prompt token after the ones before it (the first has none, so the list
    is one shorter than the prompt), with the ``top`` likeliest alternatives at each position. Alternatives need
    the whole vocabulary's log-probabilities at every position (``forward_batch``: prompt length x vocabulary
    floats, ~200 KB a token here), so they are computed only when asked."""
    tokens = [[model.vocabulary[t] for t in prompt_ids]]
    generator = model.generator
    if not top:
        scores = run_on_native_thread(lambda: generator.score_batch(tokens)[0].log_probs, "llm-engine-score")
        return [TokenLogprob(t, float(lp)) for t, lp in zip(prompt_ids[1:], scores, strict=True)]

    def forward():
        out = generator.forward_batch(tokens, return_log_probs=True)
        if getattr(out, "device", "cpu") != "cpu":
            import ctranslate2

            out = out.to_device(ctranslate2.Device.cpu)
        return np.asarray(out)[0]

    rows = run_on_native_thread(forward, "llm-engine-score")
    return [TokenLogprob(t, float(rows[i, t]), top_logprobs(rows[i], top)) for i, t in enumerate(prompt_ids[1:])]
