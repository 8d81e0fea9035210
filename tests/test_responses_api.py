"""The OpenAI Responses API (/v1/responses: text, function tools, JSON output) through the official SDK against gunicorn -k gevent."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import requests
from outcomes import ended_consistently, wait_idle

QUESTION = "What is the capital of France?"
QUESTION_WEATHER = "What's the weather in Paris?"
WEATHER = {"type": "function", "name": "get_weather", "description": "Get the current weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
FORCED = {"type": "function", "name": "get_weather"}


@pytest.fixture(autouse=True)
def _served_alone(api_server):
    """Greedy outputs are compared between requests served alone: wait out streams left by earlier tests."""
    wait_idle(api_server.base)


def test_create_with_a_string_input(openai_client):
    response = openai_client.responses.create(model="smollm2", input=QUESTION, temperature=0, max_output_tokens=40)
    assert response.object == "response" and response.id.startswith("resp_") and response.output_text
    ended_consistently(response.status, response.usage.output_tokens, 40, natural=("completed",), cut="incomplete")
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
    response = openai_client.responses.create(model="smollm2", input="Write a long poem.", temperature=0, max_output_tokens=1)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 1


def test_stream_helper_gives_the_same_text(openai_client):
    alone = openai_client.responses.create(model="smollm2", input=QUESTION, temperature=0, max_output_tokens=40)
    expected = alone.output_text
    deltas = []
    with openai_client.responses.stream(model="smollm2", input=QUESTION, temperature=0, max_output_tokens=40) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert "".join(deltas) == expected == final.output_text
    assert final.status == alone.status


def test_raw_event_order_and_sequence_numbers(api_server):
    body = {"model": "smollm2", "input": QUESTION, "stream": True, "temperature": 0, "max_output_tokens": 1}
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
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"tools": [{"type": "function", "name": "x", "parameters": {"type": "bogus"}}]}, "tools[0].parameters"),
        ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "18"}]}, "input[0]"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "get_weather", "arguments": "{oops"}]}, "input[0].arguments"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ],
)
def test_bad_inputs_are_400_in_the_openai_envelope(openai_client, kwargs, param):
    request = {"model": "smollm2", "input": QUESTION, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.responses.create(**request)
    assert info.value.body["param"] == param and info.value.status_code == 400


def test_forced_function_tool_round_trip(openai_client):
    first = openai_client.responses.create(model="smollm2", input=QUESTION_WEATHER, tools=[WEATHER], tool_choice=FORCED,
                                           temperature=0, max_output_tokens=100)
    assert first.status == "completed" and [item.type for item in first.output] == ["function_call"]
    call = first.output[0]
    assert call.call_id.startswith("call_") and call.id.startswith("fc_") and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert first.tool_choice.name == "get_weather" and first.tools[0].name == "get_weather"
    call_item = call.model_dump(exclude_none=True)

    def answer(result: str):
        history = [{"role": "user", "content": QUESTION_WEATHER}, call_item,
                   {"type": "function_call_output", "call_id": call_item["call_id"], "output": result}]
        return openai_client.responses.create(model="smollm2", input=history, tools=[WEATHER], tool_choice="none",
                                              temperature=0, max_output_tokens=60)

    final, other = answer("18 degrees C and sunny"), answer("25 degrees C and raining")
    assert final.output[0].type == "message" and final.output_text
    ended_consistently(final.status, final.usage.output_tokens, 60, natural=("completed",), cut="incomplete")
    assert other.usage.input_tokens > final.usage.input_tokens  # the tool's result is in the prompt


def test_stream_helper_with_a_forced_function_tool(openai_client):
    with openai_client.responses.stream(model="smollm2", input=QUESTION_WEATHER, tools=[WEATHER], tool_choice="required",
                                        temperature=0, max_output_tokens=100) as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(deltas) > 1 and "".join(deltas) == done[0].arguments
    assert not [e for e in events if e.type == "response.output_text.delta"]
    assert final.status == "completed" and final.output[0].type == "function_call"
    jsonschema.validate(json.loads(final.output[0].arguments), WEATHER["parameters"])
    assert events[-1].type == "response.completed"


def test_auto_calls_are_generated_under_the_tools_schema(openai_client):
    """tool_choice auto: earlier calls in the input make the model open one itself; from its opening on, the call is
    generated under the tool's schema, streamed as argument deltas after any text."""
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "unit"], "properties": {
        "city": {"type": "string", "minLength": 1}, "unit": {"enum": ["celsius", "fahrenheit"]}}}
    tool = {"type": "function", "name": "get_forecast", "description": "Weather forecast for a city", "parameters": schema}
    history = []
    for k, city in enumerate(("Berlin", "Boston")):
        history += [{"role": "user", "content": f"Forecast for {city}, please."},
                    {"type": "function_call", "call_id": f"call_{k}", "name": "get_forecast",
                     "arguments": json.dumps({"city": city, "unit": "celsius"})},
                    {"type": "function_call_output", "call_id": f"call_{k}", "output": "Sunny, 20 degrees."},
                    {"role": "assistant", "content": f"It will be sunny in {city}."}]
    history.append({"role": "user", "content": "Forecast for Rome, please."})
    made = 0
    for _ in range(4):
        with openai_client.responses.stream(model="smollm2", input=history, tools=[tool], temperature=1.0,
                                            max_output_tokens=120) as stream:
            events = list(stream)
        # a sampled answer may reach max_output_tokens: the stream then ends with response.incomplete, which the
        # SDK's get_final_response() refuses ("Didn't receive a `response.completed` event"); both carry the response
        final = events[-1].response
        calls = [item for item in final.output if item.type == "function_call"]
        for call in calls:
            assert call.name == "get_forecast"
            jsonschema.validate(json.loads(call.arguments), schema)
        assert "<tool_call>" not in final.output_text
        assert events[-1].type in ("response.completed", "response.incomplete")
        made += len(calls)
    assert made, "the model never opened a call: the constrained path was not exercised"


def test_raw_event_order_for_a_function_call(api_server):
    body = {"model": "smollm2", "input": QUESTION_WEATHER, "stream": True, "temperature": 0, "max_output_tokens": 60,
            "tools": [WEATHER], "tool_choice": FORCED}
    response = requests.post(api_server.base + "/v1/responses", json=body, stream=True, timeout=60)
    payloads = [json.loads(line[6:]) for line in response.iter_lines(decode_unicode=True) if line and line.startswith("data: ")]
    names = [p["type"] for p in payloads]
    deltas = names.count("response.function_call_arguments.delta")
    assert names == (["response.created", "response.in_progress", "response.output_item.added"]
                     + ["response.function_call_arguments.delta"] * deltas
                     + ["response.function_call_arguments.done", "response.output_item.done", "response.completed"])
    assert [p["sequence_number"] for p in payloads] == list(range(len(payloads)))
    added, done = payloads[2]["item"], payloads[-2]["item"]
    assert added["arguments"] == "" and added["status"] == "in_progress" and done["status"] == "completed"
    assert added["id"] == done["id"] and added["call_id"] == done["call_id"]
    assert payloads[-1]["response"]["output"] == [done]


def test_text_format_json_schema(openai_client):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"]}
    fmt = {"format": {"type": "json_schema", "name": "capital", "schema": schema}}
    response = openai_client.responses.create(model="smollm2", input="Give the city and country of the capital of France.",
                                              text=fmt, temperature=0, max_output_tokens=100)
    if response.status == "incomplete":
        assert response.output_text.startswith("{") and response.usage.output_tokens == 100
    else:
        jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text.format.type == "json_schema"
