"""The Anthropic Messages API through the official SDK against gunicorn -k gevent.

The current SDK (2.x) no longer has ``temperature``/``top_p``/``top_k``
arguments; clients that want them send them through ``extra_body``, as here.
"""

from __future__ import annotations

import json

import anthropic
import pytest
import requests
from outcomes import ended_consistently, wait_idle

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0}


@pytest.fixture(autouse=True)
def _served_alone(api_server):
    """Greedy outputs are compared between requests served alone: wait out streams left by earlier tests."""
    wait_idle(api_server.base)


def test_create_plain(anthropic_client):
    message = anthropic_client.messages.create(model="smollm2", max_tokens=40, messages=FRANCE, extra_body=GREEDY)
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == "smollm2"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_sequence is None
    ended_consistently(message.stop_reason, message.usage.output_tokens, 40, natural=("end_turn",), cut="max_tokens")
    assert message.usage.input_tokens == 37 and message.usage.output_tokens > 0


def test_system_as_blocks_equals_system_string(anthropic_client):
    kwargs = dict(model="smollm2", max_tokens=20, extra_body=GREEDY,
                  messages=[{"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                                         {"type": "text", "text": "of France?"}]}])
    blocks = anthropic_client.messages.create(system=[{"type": "text", "text": "Answer in one word."}], **kwargs)
    string = anthropic_client.messages.create(system="Answer in one word.", **kwargs)
    assert blocks.content[0].text == string.content[0].text
    assert blocks.usage.input_tokens == string.usage.input_tokens


def test_stop_sequences(anthropic_client):
    # The stop sequence is cut from this machine's own greedy answer, so it occurs whatever the model writes.
    full = anthropic_client.messages.create(model="smollm2", max_tokens=40, messages=FRANCE, extra_body=GREEDY).content[0].text
    stop = full[len(full) // 3: len(full) // 3 + 5]
    message = anthropic_client.messages.create(model="smollm2", max_tokens=40, messages=FRANCE, extra_body=GREEDY,
                                               stop_sequences=[stop])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop
    assert message.content[0].text == full[: full.index(stop)]


def test_small_max_tokens(anthropic_client):
    message = anthropic_client.messages.create(model="smollm2", max_tokens=1, messages=FRANCE, extra_body=GREEDY)
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 1


def test_stream_matches_non_streamed_greedy_text(anthropic_client):
    message = anthropic_client.messages.create(model="smollm2", max_tokens=40, messages=FRANCE, extra_body=GREEDY)
    with anthropic_client.messages.stream(model="smollm2", max_tokens=40, messages=FRANCE, extra_body=GREEDY) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == message.content[0].text == final.content[0].text
    assert final.stop_reason == message.stop_reason
    assert final.usage.output_tokens == message.usage.output_tokens
    assert final.usage.input_tokens == message.usage.input_tokens


def test_count_tokens(anthropic_client):
    count = anthropic_client.messages.count_tokens(model="smollm2", messages=FRANCE)
    message = anthropic_client.messages.create(model="smollm2", max_tokens=1, messages=FRANCE)
    assert count.input_tokens == message.usage.input_tokens == 37
    with_system = anthropic_client.messages.count_tokens(model="smollm2", messages=FRANCE, system="Be brief.")
    assert with_system.input_tokens != count.input_tokens


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ({"messages": FRANCE}, "max_tokens"),
        ({"max_tokens": 10, "messages": [{"role": "tool", "content": "x"}, *FRANCE]}, "role must be"),
        ({"max_tokens": 10, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}, "image"),
        ({"max_tokens": 10, "messages": FRANCE, "temperature": 1.5}, "temperature"),
        ({"max_tokens": 10, "messages": []}, "messages"),
        ({"max_tokens": 10, "messages": [{"role": "user", "content": "hi " * 9000}]}, "prompt is too long: "),
    ],
)
def test_bad_input_raises_bad_request(api_server, body, text):
    body = dict(body)
    raw = requests.post(api_server.base + "/v1/messages", json={"model": "smollm2", **body}, timeout=30)
    assert raw.status_code == 400
    envelope = raw.json()
    assert envelope["type"] == "error" and envelope["error"]["type"] == "invalid_request_error"
    assert envelope["request_id"].startswith("req_")
    client = anthropic.Anthropic(base_url=api_server.base, api_key="x", max_retries=0)
    sampling = {k: body.pop(k) for k in ("temperature",) if k in body}
    with pytest.raises(anthropic.BadRequestError) as info:
        if "max_tokens" in body:
            client.messages.create(model="smollm2", extra_body=sampling or None, **body)
        else:  # messages.create refuses to send this; the SDK's generic request path does
            client.post("/v1/messages", cast_to=anthropic.types.Message, body={"model": "smollm2", **body})
    assert text in str(info.value)


def test_unknown_model_is_not_found(anthropic_client):
    with pytest.raises(anthropic.NotFoundError) as info:
        anthropic_client.messages.create(model="claude-opus-4", max_tokens=5, messages=FRANCE)
    assert info.value.body["error"]["type"] == "not_found_error"


def test_auth_and_version_headers_are_accepted(api_server):
    for headers in ({"x-api-key": "k", "anthropic-version": "2023-06-01"}, {"Authorization": "Bearer k"}):
        response = requests.post(api_server.base + "/v1/messages", headers=headers, timeout=60,
                                 json={"model": "smollm2", "max_tokens": 3, "messages": FRANCE})
        assert response.status_code == 200


def test_raw_sse_event_order(api_server):
    body = {"model": "smollm2", "max_tokens": 12, "messages": FRANCE, "temperature": 0, "stream": True}
    response = requests.post(api_server.base + "/v1/messages", json=body, stream=True, timeout=60)
    assert response.headers["Content-Type"].startswith("text/event-stream")
    lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    events = []
    for i, line in enumerate(lines):
        if line.startswith("data: "):
            assert lines[i - 1].startswith("event: "), "every data line follows its event line"
            name = lines[i - 1][len("event: "):]
            payload = json.loads(line[len("data: "):])
            assert payload["type"] == name
            events.append(name)
    names = [e for e in events if e != "ping"]
    deltas = names.count("content_block_delta")
    assert deltas > 0
    assert names == (["message_start", "content_block_start"] + ["content_block_delta"] * deltas
                     + ["content_block_stop", "message_delta", "message_stop"])
    assert "[DONE]" not in "".join(lines)


def _post_stream(api_server, body):
    response = requests.post(api_server.base + "/v1/messages", json=body, stream=True, timeout=60)
    return response, response.iter_lines(decode_unicode=True)


def test_ping_events_while_the_model_is_busy(api_server):
    # The busy generations go through the OpenAI route, which takes min_tokens: they cannot end early.
    long_body = {"model": "smollm2", "max_tokens": 200, "min_tokens": 200, "stream": True,
                 "messages": [{"role": "user", "content": "Write a long story."}]}
    # different sampling settings cannot share a batch: both engine replicas get busy
    busy = [requests.post(api_server.base + "/v1/chat/completions", json={**long_body, "temperature": t}, stream=True, timeout=60)
            for t in (0, 0.5)]
    readers = [response.iter_lines(decode_unicode=True) for response in busy]  # kept: a dropped reader closes its stream
    for lines in readers:  # both are generating
        next(line for line in lines if '"content":"' in line and '"content":""' not in line)
    # sampling settings neither busy batch has: it can join neither, so it waits
    response, lines = _post_stream(api_server, {"model": "smollm2", "max_tokens": 3, "stream": True, "temperature": 0.9,
                                                "messages": [{"role": "user", "content": "Write a long story."}]})
    seen = list(lines)
    assert "event: ping" in seen and "event: message_stop" in seen
    assert seen.index("event: ping") < seen.index("event: message_stop")
    for r in busy:
        r.close()


def test_disconnect_cancels_generation(api_server):
    import time

    body = {"model": "smollm2", "max_tokens": 1000, "stream": True, "temperature": 0, "stop_sequences": ["@@@"],
            "messages": [{"role": "user", "content": "Write a long story."}]}
    for _ in range(3):
        response, lines = _post_stream(api_server, body)
        next(line for line in lines if line.startswith("event: content_block_delta"))
        response.close()
    time.sleep(1.5)
    started = time.monotonic()
    reply = requests.post(api_server.base + "/v1/messages", timeout=60,
                          json={"model": "smollm2", "max_tokens": 5, "messages": FRANCE})
    assert reply.status_code == 200 and time.monotonic() - started < 5


def test_context_errors_use_anthropics_wording_so_clients_can_retry(anthropic_client):
    """Claude Code asks for max_tokens 32,000; on a smaller context it parses Anthropic's sentence, lowers max_tokens
    to what is left and retries (issue #36). The OpenAI routes keep OpenAI's sentence (tests/test_first_hour.py)."""
    import re

    prompt = anthropic_client.messages.count_tokens(model="smollm2", messages=FRANCE).input_tokens
    with pytest.raises(anthropic.BadRequestError) as info:
        anthropic_client.messages.create(model="smollm2", max_tokens=32000, messages=FRANCE)
    assert info.value.status_code == 400 and info.value.body["error"]["type"] == "invalid_request_error"
    found = re.search(r"input length and `max_tokens` exceed context limit: (\d+) \+ (\d+) > (\d+)", info.value.message)
    assert found, info.value.message
    used, asked, limit = map(int, found.groups())
    assert used >= prompt and asked == 32000 and limit > used
    retried = anthropic_client.messages.create(model="smollm2", max_tokens=min(limit - used, 8), messages=FRANCE)
    assert retried.stop_reason in ("end_turn", "max_tokens") and retried.usage.input_tokens == used


def test_system_entries_among_the_messages_are_taken(anthropic_client):
    """Claude Code 2.1.154 and later sends ``role: "system"`` entries inside ``messages`` (Ollama and vLLM refused
    them with 400): first they join the system prompt, later the user turn they follow."""
    system_first = [{"role": "system", "content": "Answer in French."}, *FRANCE]
    reminder = [*FRANCE, {"role": "assistant", "content": "Paris."},
                {"role": "system", "content": "<system-reminder>Be brief.</system-reminder>"},
                {"role": "user", "content": "And of Italy?"}]
    for messages in (system_first, reminder):
        counted = anthropic_client.messages.count_tokens(model="smollm2", messages=messages).input_tokens
        reply = anthropic_client.messages.create(model="smollm2", max_tokens=4, messages=messages, extra_body=GREEDY)
        assert reply.usage.input_tokens == counted
    plain = anthropic_client.messages.count_tokens(model="smollm2", system="Answer in French.", messages=FRANCE)
    assert anthropic_client.messages.count_tokens(model="smollm2", messages=system_first).input_tokens == plain.input_tokens


def test_claude_codes_billing_header_does_not_change_the_prompt(anthropic_client):
    """Claude Code's first system block carries a nonce (cch=) that changes with every request; left in, no two
    prompts would share their beginning and the prompt cache could never be read (issue #36). It is dropped."""
    rules = "You are a helpful assistant. " * 30

    def system(nonce: str | None) -> list[dict]:
        blocks = [{"type": "text", "text": rules, "cache_control": {"type": "ephemeral"}}]
        if nonce:
            blocks.insert(0, {"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.1.197.a1b; "
                                                      f"cc_entrypoint=sdk-cli; cch={nonce};"})
        return blocks

    counts = {anthropic_client.messages.count_tokens(model="smollm2", system=system(nonce), messages=FRANCE).input_tokens
              for nonce in (None, "36ee5", "0aaa9")}
    assert len(counts) == 1
    first = anthropic_client.messages.create(model="smollm2", max_tokens=2, system=system("11111"), messages=FRANCE)
    second = anthropic_client.messages.create(model="smollm2", max_tokens=2, system=system("22222"), messages=FRANCE)
    assert first.usage.input_tokens + (first.usage.cache_read_input_tokens or 0) + \
        (first.usage.cache_creation_input_tokens or 0) == counts.pop()
    assert second.usage.cache_read_input_tokens and second.usage.cache_read_input_tokens > 64
