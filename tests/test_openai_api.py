"""The OpenAI API through the official SDK against gunicorn -k gevent."""

from __future__ import annotations

import json
import socket
import time

import openai
import pytest
import requests
from outcomes import ended_consistently, wait_idle

from llm_blueprint.engine.default_model import DEFAULT_EMBEDDING_NAME

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(autouse=True)
def _served_alone(api_server):
    """Greedy outputs are compared between requests served alone: wait out streams left by earlier tests."""
    wait_idle(api_server.base)


def test_chat_completion(openai_client):
    reply = openai_client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=40)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert choice.message.content and choice.message.role == "assistant"
    ended_consistently(choice.finish_reason, reply.usage.completion_tokens, 40)
    assert reply.usage.prompt_tokens == 37 and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_system_developer_and_text_parts(openai_client):
    messages = [
        {"role": "developer", "content": "Answer in one word."},
        {"role": "user", "content": [{"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of France?"}]},
    ]
    reply = openai_client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_completion_tokens=20)
    assert reply.choices[0].message.content
    plain = openai_client.chat.completions.create(
        model="smollm2", temperature=0, max_tokens=20,
        messages=[{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "What is the capital of France?"}],
    )
    assert plain.choices[0].message.content == reply.choices[0].message.content
    assert plain.usage.prompt_tokens == reply.usage.prompt_tokens


def test_streaming_chat_equals_non_streaming(openai_client):
    full = openai_client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=40)
    stream = openai_client.chat.completions.create(
        model="smollm2", messages=FRANCE, temperature=0, max_tokens=40, stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_n_two_choices(openai_client):
    reply = openai_client.chat.completions.create(model="smollm2", messages=FRANCE, n=2, temperature=0.8, seed=3, max_tokens=20)
    assert [c.index for c in reply.choices] == [0, 1]
    stream = openai_client.chat.completions.create(model="smollm2", messages=FRANCE, n=2, temperature=0, max_tokens=10, stream=True,
                                                   extra_body={"min_tokens": 1})
    texts = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts[0] == texts[1] != ""


def test_stop_strings(openai_client):
    # The stop strings are cut from this machine's own greedy answer (min_tokens keeps it long enough).
    kwargs = dict(model="smollm2", messages=FRANCE, temperature=0, max_tokens=40, extra_body={"min_tokens": 20})
    full = openai_client.chat.completions.create(**kwargs).choices[0].message.content
    stop = full[len(full) // 3: len(full) // 3 + 5]
    reply = openai_client.chat.completions.create(stop=[stop, "\x01never"], **kwargs)
    assert reply.choices[0].message.content == full[: full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    later = full[len(full) // 2: len(full) // 2 + 4]
    single = openai_client.chat.completions.create(stop=later, **kwargs)
    assert single.choices[0].message.content == full[: full.index(later)] and later not in single.choices[0].message.content


def test_max_tokens_gives_finish_reason_length(openai_client):
    reply = openai_client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Write a long poem."}],
                                                  temperature=0, max_tokens=3, extra_body={"min_tokens": 3})
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3


def test_logprobs(openai_client):
    reply = openai_client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=8, logprobs=True)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(c.token for c in content) == reply.choices[0].message.content
    assert all(c.logprob <= 0 for c in content)


def test_seed_reproducible_over_http(openai_client):
    kwargs = dict(model="smollm2", messages=[{"role": "user", "content": "Tell me a story."}], temperature=1.0, max_tokens=16)
    a = openai_client.chat.completions.create(seed=11, **kwargs).choices[0].message.content
    b = openai_client.chat.completions.create(seed=11, **kwargs).choices[0].message.content
    assert a == b


def test_completions_with_list_prompt(openai_client):
    # min_tokens: both completions are exactly max_tokens long whatever the model writes.
    reply = openai_client.completions.create(model="smollm2", prompt=["Once upon a time", "The sky is"], temperature=0, max_tokens=6,
                                             extra_body={"min_tokens": 6})
    assert reply.object == "text_completion" and [c.index for c in reply.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in reply.choices)
    assert reply.usage.completion_tokens == 12
    # Greedy texts are compared only between requests served alike (each alone): a prompt list batches its prompts
    # together, and different prompt lengths in one batch change int8 numerics (see test_deterministic.py).
    alone = openai_client.completions.create(model="smollm2", prompt="Once upon a time", temperature=0, max_tokens=6)
    echoed = openai_client.completions.create(model="smollm2", prompt="Once upon a time", temperature=0, max_tokens=6, echo=True, logprobs=1)
    assert echoed.choices[0].text == "Once upon a time" + alone.choices[0].text
    # echo lists the prompt's tokens first (the first with a null logprob), then the completion's
    assert len(echoed.choices[0].logprobs.token_logprobs) == alone.usage.prompt_tokens + alone.usage.completion_tokens
    assert echoed.choices[0].logprobs.token_logprobs[0] is None
    default = openai_client.completions.create(model="smollm2", prompt="Count: 1, 2, 3,", temperature=0)
    assert default.usage.completion_tokens <= 16


def test_streaming_completions(openai_client):
    text = "".join(c.choices[0].text for c in openai_client.completions.create(
        model="smollm2", prompt="Once upon a time", temperature=0, max_tokens=6, stream=True) if c.choices)
    reply = openai_client.completions.create(model="smollm2", prompt="Once upon a time", temperature=0, max_tokens=6)
    assert text == reply.choices[0].text


def test_models(openai_client):
    models = openai_client.models.list()
    assert [m.id for m in models.data] == ["smollm2", DEFAULT_EMBEDDING_NAME]  # the README installs its package
    assert openai_client.models.retrieve("smollm2").id == "smollm2"
    with pytest.raises(openai.NotFoundError):
        openai_client.models.retrieve("gpt-4o")
    with pytest.raises(openai.NotFoundError) as info:
        openai_client.chat.completions.create(model="gpt-4o", messages=FRANCE)
    assert info.value.code == "model_not_found"


@pytest.mark.parametrize(
    ("kwargs", "param", "text"),
    [
        ({"temperature": 3}, "temperature", "temperature"),
        ({"max_tokens": 0}, "max_tokens", "max_tokens"),
        ({"n": 0}, "n", "'n'"),
        ({"messages": []}, "messages", "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
         "messages[0].content[0].type", "image_url"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "role"),
        ({"messages": [{"role": "user", "content": "hi " * 9000}]}, "messages", "maximum context length"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "stop"),
        ({"top_p": "high"}, "top_p", "top_p"),
    ],
)
def test_bad_input_is_a_400_naming_the_param(openai_client, kwargs, param, text):
    request = {"model": "smollm2", "messages": FRANCE, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(**request)
    error = info.value.body
    assert error["param"] == param
    assert text in error["message"]
    assert info.value.status_code == 400


def test_context_length_error_code(openai_client):
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi " * 9000}])
    assert info.value.code == "context_length_exceeded"


def test_non_json_and_broken_bodies_get_the_openai_envelope(api_server):
    for body, headers in [(b"not json", {}), (b"\xff\xfe{", {"Content-Type": "application/json"}), (b"[1,2]", {}),
                          (b"", {}), (b'{"model": "smollm2"}', {}), (b"[" * 100000, {})]:
        response = requests.post(api_server.base + "/v1/chat/completions", data=body, headers=headers, timeout=30)
        assert response.status_code == 400, (body[:20], response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert requests.get(api_server.base + "/v1/models", timeout=10).status_code == 200


def test_unknown_fields_are_ignored(api_server):
    body = {"model": "smollm2", "messages": FRANCE, "max_tokens": 3, "temperature": 0, "frobnicate": {"x": 1}}
    response = requests.post(api_server.base + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200


def _raw_stream(api_server, body):
    response = requests.post(api_server.base + "/v1/chat/completions", json=body, stream=True, timeout=60)
    return response, response.iter_lines(decode_unicode=True)


def test_sse_wire_format(api_server):
    response, lines = _raw_stream(api_server, {"model": "smollm2", "messages": FRANCE, "stream": True, "max_tokens": 4, "min_tokens": 4,
                                               "temperature": 0})
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Cache-Control"] == "no-cache" and response.headers["X-Accel-Buffering"] == "no"
    data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_keepalive_comments_while_waiting(api_server):
    """Two long streams keep both engine replicas busy; a third waits and gets keep-alives."""
    long_body = {"model": "smollm2", "messages": [{"role": "user", "content": "Write a long story."}], "stream": True,
                 "max_tokens": 200, "min_tokens": 200, "temperature": 0}
    # different sampling settings cannot share a batch: both engine replicas get busy
    busy = [_raw_stream(api_server, {**long_body, "temperature": t}) for t in (0, 0.5)]
    for _, lines in busy:  # both are generating
        next(line for line in lines if '"content":"' in line and '"content":""' not in line)
    # sampling settings neither busy batch has: it can join neither, so it waits
    response, lines = _raw_stream(api_server, {**long_body, "max_tokens": 3, "min_tokens": 0, "temperature": 0.9})
    seen = []
    for line in lines:
        seen.append(line)
        if line == "data: [DONE]":
            break
    assert ": keep-alive" in seen
    for r, _ in busy:
        r.close()


def test_client_disconnect_cancels_generation(api_server):
    """A client that vanishes mid-stream frees its engine slot; the worker serves on."""
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Write a long story."}], "stream": True,
            "max_tokens": 1000, "temperature": 0, "stop": ["@@@"]}
    payload = json.dumps(body).encode()
    for _ in range(3):  # more vanishing clients than engine replicas
        sock = socket.create_connection(("127.0.0.1", api_server.port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        received = b""
        while b"data:" not in received:
            chunk = sock.recv(4096)
            assert chunk
            received += chunk
        sock.close()
    time.sleep(1.5)  # the next keep-alive or token write fails and cancels each generation
    started = time.monotonic()
    reply = requests.post(api_server.base + "/v1/chat/completions", timeout=60,
                          json={"model": "smollm2", "messages": FRANCE, "max_tokens": 5, "temperature": 0})
    assert reply.status_code == 200
    assert time.monotonic() - started < 5  # 1000-token generations would take far longer


def test_top_logprobs_are_real_alternatives(openai_client):
    reply = openai_client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=8, logprobs=True,
                                                  top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        top = entry.top_logprobs
        assert len(top) == 3 and top[0].token == entry.token  # greedy: the chosen token is the likeliest
        assert abs(top[0].logprob - entry.logprob) < 1e-3
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True) and top[2].logprob < 0
        assert len({t.token for t in top}) == 3 or len({tuple(t.bytes) for t in top}) == 3
    assert bytes(b for entry in content for b in entry.bytes).decode("utf-8") == reply.choices[0].message.content
    chunks = list(openai_client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=8,
                                                        logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [[t.token for t in e.top_logprobs] for e in streamed] == [[t.token for t in e.top_logprobs] for e in content]
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=2, top_logprobs=2)
    assert info.value.body["param"] == "top_logprobs"


def test_completion_top_logprobs(openai_client):
    reply = openai_client.completions.create(model="smollm2", prompt="The sky is", temperature=0, max_tokens=5, logprobs=2,
                                             extra_body={"min_tokens": 5})
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.top_logprobs) == 5
    for token, chosen, alternatives in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert len(alternatives) == 2 and max(alternatives, key=alternatives.get) == token
        assert abs(alternatives[token] - chosen) < 1e-3
    streamed = [lp for c in openai_client.completions.create(model="smollm2", prompt="The sky is", temperature=0, max_tokens=5,
                                                             logprobs=2, stream=True, extra_body={"min_tokens": 5})
                if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.top_logprobs]
    assert streamed == logprobs.top_logprobs
