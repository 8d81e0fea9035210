"""Every stream ends with its protocol's final events: nothing in a stream's body needs the request context,
and a failure mid-stream still ends it the protocol's way."""

from __future__ import annotations

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_streamed_chat_with_logprobs_completes(openai_client):
    options = {"model": "smollm2", "messages": FRANCE, "temperature": 0, "max_tokens": 20, "logprobs": True}
    full = openai_client.chat.completions.create(**options)
    chunks = list(openai_client.chat.completions.create(**options, stream=True))
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    streamed = [entry for c in chunks if c.choices and c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    assert streamed and all(entry.logprob <= 0 and entry.bytes == list(entry.token.encode()) for entry in streamed)
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in full.choices[0].logprobs.content]


def test_streamed_completion_with_logprobs_completes(openai_client):
    options = {"model": "smollm2", "prompt": "The capital of France is", "temperature": 0, "max_tokens": 8, "logprobs": 1}
    full = openai_client.completions.create(**options)
    chunks = list(openai_client.completions.create(**options, stream=True))
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    tokens = [token for c in chunks if c.choices and c.choices[0].logprobs for token in c.choices[0].logprobs.tokens]
    offsets = [offset for c in chunks if c.choices and c.choices[0].logprobs for offset in c.choices[0].logprobs.text_offset]
    assert tokens and tokens == full.choices[0].logprobs.tokens
    assert offsets == full.choices[0].logprobs.text_offset
