"""The OpenAI Responses API (/v1/responses, text) through the official SDK against gunicorn -k gevent."""

from __future__ import annotations

import json

import openai
import pytest
import requests

QUESTION = "What is the capital of France?"


def test_create_with_a_string_input(openai_client):
    response = openai_client.responses.create(model="smollm2", input=QUESTION, temperature=0, max_output_tokens=40)
    assert response.object == "response" and response.id.startswith("resp_") and response.status == "completed"
    assert "Paris" in response.output_text
    assert response.output[0].type == "message" and response.output[0].content[0].type == "output_text"
    usage = response.usage
    assert usage.input_tokens == 37 and usage.output_tokens > 0 and usage.total_tokens == usage.input_tokens + usage.output_tokens
    chat = openai_client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                                 temperature=0, max_tokens=40)
    assert response.output_text == chat.choices[0].message.content  # one pipeline, same greedy text


def test_message_items_and_instructions(openai_client):
    items = [{"role": "user", "content": [{"type": "input_text", "text": "What is the capital "},
                                          {"type": "input_text", "text": "of France?"}]}]
    response = openai_client.responses.create(model="smollm2", input=items, instructions="Answer in one word.",
                                              temperature=0, max_output_tokens=20)
    chat = openai_client.chat.completions.create(
        model="smollm2", temperature=0, max_tokens=20,
        messages=[{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": QUESTION}])
    assert response.output_text == chat.choices[0].message.content
    assert response.instructions == "Answer in one word."


def test_max_output_tokens_gives_incomplete(openai_client):
    response = openai_client.responses.create(model="smollm2", input="Write a long poem.", temperature=0, max_output_tokens=3)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3


def test_stream_helper_gives_the_same_text(openai_client):
    expected = openai_client.responses.create(model="smollm2", input=QUESTION, temperature=0, max_output_tokens=40).output_text
    deltas = []
    with openai_client.responses.stream(model="smollm2", input=QUESTION, temperature=0, max_output_tokens=40) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert "".join(deltas) == expected == final.output_text
    assert final.status == "completed"


def test_raw_event_order_and_sequence_numbers(api_server):
    body = {"model": "smollm2", "input": QUESTION, "stream": True, "temperature": 0, "max_output_tokens": 6}
    response = requests.post(api_server.base + "/v1/responses", json=body, stream=True, timeout=60)
    lines = [line for line in response.iter_lines(decode_unicode=True) if line and not line.startswith(":")]
    names, numbers = [], []
    for i, line in enumerate(lines):
        if line.startswith("data: "):
            payload = json.loads(line[6:])
            assert lines[i - 1] == f"event: {payload['type']}"
            names.append(payload["type"])
            numbers.append(payload["sequence_number"])
    deltas = names.count("response.output_text.delta")
    assert deltas > 0 and numbers == list(range(len(numbers)))
    assert names == (["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
                     + ["response.output_text.delta"] * deltas
                     + ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                        "response.incomplete"])


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"temperature": 3}, "temperature"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]}, "input"),
        ({"input": []}, "input"),
        ({"input": "hi " * 9000}, "messages"),
    ],
)
def test_bad_inputs_are_400_in_the_openai_envelope(openai_client, kwargs, param):
    request = {"model": "smollm2", "input": QUESTION, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.responses.create(**request)
    assert info.value.body["param"] == param and info.value.status_code == 400
