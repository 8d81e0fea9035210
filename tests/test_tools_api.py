"""Tool calling, JSON output and reasoning through the official SDKs against gunicorn -k gevent, default model.

SmolLM2-135M was never trained on tool use; these tests pin what the server
guarantees whatever the model writes (a forced call is a real call whose
arguments validate against the tool's schema, and a JSON answer validates:
both are constrained token by token; no markup leaks; a JSON answer cut by
max_tokens says length). They never pin what the model happens to write:
int8 numerics differ between CPUs.
"""

from __future__ import annotations

import json
import os
import re

import anthropic
import jsonschema
import openai
import pytest
import requests
from outcomes import ended_consistently, wait_idle

GREEDY = {"temperature": 0}
QUESTION = "What's the weather in Paris?"
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather for a city",
                                            "parameters": WEATHER_SCHEMA}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Get the current time in a timezone",
                                         "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}},
                                                        "required": ["timezone"]}}}
WEATHER_ANTHROPIC = {"name": "get_weather", "description": "Get the current weather for a city", "input_schema": WEATHER_SCHEMA}
FORCED = {"type": "function", "function": {"name": "get_weather"}}
RESULT = "18 degrees C and sunny"
OTHER_RESULT = "25 degrees C and raining"


@pytest.fixture(autouse=True)
def _served_alone(api_server):
    """Greedy outputs are compared between requests served alone: wait out streams left by earlier tests."""
    wait_idle(api_server.base)


# ----------------------------------------------------------------------------- OpenAI
def _openai_answer(openai_client, call: dict, result: str):
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": result}]
    return openai_client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER], tool_choice="none",
                                                 max_tokens=60, **GREEDY)


def test_openai_forced_weather_round_trip(openai_client):
    messages = [{"role": "user", "content": QUESTION}]
    first = openai_client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER],
                                                  tool_choice=FORCED, max_tokens=100, **GREEDY)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (made,) = choice.message.tool_calls
    assert made.id.startswith("call_") and made.type == "function" and made.function.name == "get_weather"
    jsonschema.validate(json.loads(made.function.arguments), WEATHER_SCHEMA)
    call = made.model_dump(exclude_none=True)

    final, other = _openai_answer(openai_client, call, RESULT), _openai_answer(openai_client, call, OTHER_RESULT)
    answer = final.choices[0]
    assert not answer.message.tool_calls and answer.message.content
    ended_consistently(answer.finish_reason, final.usage.completion_tokens, 60)
    assert other.usage.prompt_tokens > final.usage.prompt_tokens  # the tool's result is in the prompt


def _stream_chat(client, **kwargs):
    chunks = list(client.chat.completions.create(model="smollm2", stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls: dict[int, dict] = {}
    firsts = []
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if delta.index not in calls:
                firsts.append(delta)
                calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
            calls[delta.index]["arguments"] += delta.function.arguments or ""
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return chunks, text, calls, firsts, finish


def test_openai_forced_weather_round_trip_streamed(openai_client):
    messages = [{"role": "user", "content": QUESTION}]
    kwargs = dict(messages=messages, tools=[WEATHER], tool_choice=FORCED, max_tokens=100, **GREEDY)
    streamed = _stream_chat(openai_client, **kwargs)
    whole = openai_client.chat.completions.create(model="smollm2", **kwargs)
    chunks, text, calls, firsts, finish = streamed
    assert text == "" and finish == ["tool_calls"]
    assert firsts[0].id.startswith("call_") and firsts[0].type == "function" and firsts[0].function.arguments == ""
    fragments = [d.function.arguments for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])][1:]
    assert len(fragments) > 1  # arguments arrive in pieces, as generated
    assert calls[0]["arguments"] == whole.choices[0].message.tool_calls[0].function.arguments
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER_SCHEMA)
    call = {"id": calls[0]["id"], "type": "function", "function": {"name": "get_weather", "arguments": calls[0]["arguments"]}}

    messages = messages + [{"role": "assistant", "content": None, "tool_calls": [call]},
                           {"role": "tool", "tool_call_id": call["id"], "content": RESULT}]
    with openai_client.chat.completions.stream(model="smollm2", messages=messages, tools=[WEATHER], tool_choice="none",
                                               max_tokens=60, **GREEDY) as stream:
        final = stream.get_final_completion()
    alone = _openai_answer(openai_client, call, RESULT)
    assert final.choices[0].message.content == alone.choices[0].message.content
    assert final.choices[0].finish_reason == alone.choices[0].finish_reason
    ended_consistently(alone.choices[0].finish_reason, alone.usage.completion_tokens, 60)


def test_openai_stream_helper_accumulates_the_call(openai_client):
    def stream_call():
        with openai_client.chat.completions.stream(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                                   tools=[WEATHER], tool_choice="required", max_tokens=100, **GREEDY) as stream:
            return stream.get_final_completion()

    final = stream_call()
    call = final.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_SCHEMA)


def _likeliest_tool(model_dir: str, question: str, tools: list[dict]) -> tuple[str, dict[str, float]]:
    """The tool name the model itself scores likeliest after a forced call's opening, computed here with
    CTranslate2's own scoring (the same int8 model, batched as the server batches it)."""
    from llm_blueprint.chat.conversation import ChatRequest, Message, Tool, ToolChoice
    from llm_blueprint.chat.prompt import call_opening, render
    from llm_blueprint.engine import Model

    model = Model(model_dir)
    try:
        specs = [Tool(t["function"]["name"], t["function"]["description"], t["function"]["parameters"]) for t in tools]
        prompt = render(model, ChatRequest([Message("user", question)], specs, ToolChoice("required")))
        head = prompt.text + call_opening(prompt, None)
        candidates = [model.encode_text(head + json.dumps(t.name)[1:]) for t in specs]
        common = len(os.path.commonprefix(candidates))
        results = model.generator.score_batch([model.tokenizer.ids_to_tokens(c) for c in candidates])
        scores = {t.name: sum(r.log_probs[common - 1:]) for t, r in zip(specs, results, strict=True)}
    finally:
        model.close()
    return max(scores, key=scores.__getitem__), scores


def test_openai_required_picks_the_likeliest_tool(openai_client, default_model_dir):
    # Which tool is likeliest depends on the CPU's int8 numerics, so the test checks the mechanism: the server's
    # choice is the tool CTranslate2 scores likeliest, and its arguments validate.
    for question in (QUESTION, "What time is it in Tokyo right now?"):
        expected, scores = _likeliest_tool(default_model_dir, question, [WEATHER, TIME])
        response = openai_client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": question}],
                                                         tools=[WEATHER, TIME], tool_choice="required", max_tokens=200, **GREEDY)
        call = response.choices[0].message.tool_calls[0]
        assert call.function.name == expected, scores
        schema = next(t for t in (WEATHER, TIME) if t["function"]["name"] == expected)["function"]["parameters"]
        jsonschema.validate(json.loads(call.function.arguments), schema)


def test_openai_tool_choice_none_yields_text(openai_client):
    # "none" hides the tools from the prompt: the answer is the one the same question gets without tools.
    kwargs = dict(model="smollm2", messages=[{"role": "user", "content": QUESTION}], max_tokens=30, **GREEDY)
    response = openai_client.chat.completions.create(tools=[WEATHER], tool_choice="none", **kwargs)
    without = openai_client.chat.completions.create(**kwargs)
    message = response.choices[0].message
    assert not message.tool_calls and message.content == without.choices[0].message.content
    assert response.usage.prompt_tokens == without.usage.prompt_tokens
    ended_consistently(response.choices[0].finish_reason, response.usage.completion_tokens, 30)


def test_openai_auto_text_never_carries_markup(openai_client):
    # A block the model writes that is not a valid call stays text by design (see test_tool_parsing.py); what must
    # never reach the text is a valid call's markup.
    kwargs = dict(messages=[{"role": "user", "content": QUESTION}], tools=[WEATHER], max_tokens=80, **GREEDY)
    _, text, calls, _, finish = _stream_chat(openai_client, **kwargs)
    whole = openai_client.chat.completions.create(model="smollm2", **kwargs).choices[0]
    assert text == (whole.message.content or "")
    for block in text.split("<tool_call>")[1:]:
        body = block.split("</tool_call>")[0]
        try:
            value = json.loads(body)
        except ValueError:
            continue
        assert not (isinstance(value, dict) and value.get("name") == "get_weather" and isinstance(value.get("arguments"), dict))
    if calls:
        assert finish == ["tool_calls"]
    else:
        assert finish[0] in ("stop", "length")


# Auto calls: the model decides whether to call; once it opens a call, the call is generated under the tool's schema.
STRICT_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "unit", "days"], "properties": {
    "city": {"type": "string", "minLength": 1}, "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
FORECAST = {"type": "function", "function": {"name": "get_forecast", "description": "Weather forecast for a city",
                                             "parameters": STRICT_SCHEMA}}
FORECAST_ANTHROPIC = {"name": "get_forecast", "description": "Weather forecast for a city", "input_schema": STRICT_SCHEMA}
SHOTS = [("Berlin", {"city": "Berlin", "unit": "celsius", "days": 3}), ("Boston", {"city": "Boston", "unit": "fahrenheit", "days": 2})]


def _openai_history() -> list[dict]:
    """Earlier turns in which the assistant called the tool: they make the model likely to open a call itself."""
    messages = []
    for k, (city, arguments) in enumerate(SHOTS):
        call = {"id": f"call_{k}", "type": "function", "function": {"name": "get_forecast", "arguments": json.dumps(arguments)}}
        messages += [{"role": "user", "content": f"Forecast for {city}, please."},
                     {"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": f"call_{k}", "content": "Sunny, 20 degrees."},
                     {"role": "assistant", "content": f"It will be sunny in {city}."}]
    return messages + [{"role": "user", "content": "Forecast for Rome, please."}]


def test_openai_auto_calls_are_generated_under_the_tools_schema(openai_client):
    made = 0
    for seed in range(6):
        kwargs = dict(messages=_openai_history(), tools=[FORECAST], max_tokens=120, temperature=1.0, seed=seed)
        if seed % 2:
            _, text, calls, firsts, finish = _stream_chat(openai_client, **kwargs)
            calls = [(c["name"], c["arguments"]) for c in calls.values()]
            assert all(f.id.startswith("call_") for f in firsts)
        else:
            choice = openai_client.chat.completions.create(model="smollm2", **kwargs).choices[0]
            text, finish = choice.message.content or "", [choice.finish_reason]
            calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        # no call leaks into the text (the model may still name the tool in prose, sampled at temperature 1)
        assert "<tool_call>" not in text and not re.search(r'"name"\s*:\s*"get_forecast"', text), text
        for name, arguments in calls:
            assert name == "get_forecast"
            jsonschema.validate(json.loads(arguments), STRICT_SCHEMA)
        assert finish == (["tool_calls"] if calls else finish) and finish[0] in ("tool_calls", "stop", "length")
        made += len(calls)
    assert made, "the model never opened a call: the constrained path was not exercised"


def test_anthropic_auto_calls_are_generated_under_the_tools_schema(anthropic_client):
    messages = []
    for k, (city, arguments) in enumerate(SHOTS):
        messages += [{"role": "user", "content": f"Forecast for {city}, please."},
                     {"role": "assistant", "content": [{"type": "tool_use", "id": f"toolu_{k}", "name": "get_forecast",
                                                        "input": arguments}]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"toolu_{k}",
                                                   "content": "Sunny, 20 degrees."}]},
                     {"role": "assistant", "content": f"It will be sunny in {city}."}]
    messages.append({"role": "user", "content": "Forecast for Rome, please."})
    made = 0
    for attempt in range(6):
        kwargs = dict(model="smollm2", max_tokens=120, messages=messages, tools=[FORECAST_ANTHROPIC], extra_body={"temperature": 1.0})
        if attempt % 2:
            with anthropic_client.messages.stream(**kwargs) as stream:
                message = stream.get_final_message()
        else:
            message = anthropic_client.messages.create(**kwargs)
        uses = [b for b in message.content if b.type == "tool_use"]
        for use in uses:
            assert use.name == "get_forecast" and use.id.startswith("toolu_")
            jsonschema.validate(use.input, STRICT_SCHEMA)
        assert all("<tool_call>" not in b.text for b in message.content if b.type == "text")
        assert message.stop_reason == ("tool_use" if uses else message.stop_reason) in ("tool_use", "end_turn", "max_tokens")
        made += len(uses)
    assert made, "the model never opened a call: the constrained path was not exercised"


@pytest.mark.parametrize("body,param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "nonsense"}}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "string"}}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "tool", "tool_call_id": "call_x", "content": "18"}]}, "messages[0]"),
    ({"messages": [{"role": "tool", "content": "18"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
])
def test_openai_bad_tool_requests_are_400(api_server, body, param):
    payload = {"model": "smollm2", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 5, **body}
    response = requests.post(api_server.base + "/v1/chat/completions", json=payload, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


# ----------------------------------------------------------------------------- JSON output
def test_json_object_mode(openai_client):
    question = "Give the name and country of the capital of France as a JSON object."
    kwargs = dict(model="smollm2", messages=[{"role": "user", "content": question}], response_format={"type": "json_object"},
                  max_tokens=100, seed=7, **GREEDY)
    whole = openai_client.chat.completions.create(**kwargs)
    streamed = "".join(c.choices[0].delta.content or "" for c in openai_client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    content = whole.choices[0].message.content
    assert streamed == content
    if whole.choices[0].finish_reason == "length":  # cut, as the hosted APIs return it
        assert content.startswith("{") and whole.usage.completion_tokens >= 100
    else:
        assert whole.choices[0].finish_reason == "stop" and isinstance(json.loads(content), dict)


def test_json_cut_by_max_tokens_says_length(openai_client, default_model_dir):
    # Like the hosted APIs: a JSON answer cut by max_tokens comes back as cut, flagged by finish_reason. The budget is
    # one token after the prefilled opening '{"n": ', and no token of the vocabulary completes that value by itself.
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(default_model_dir, "tokenizer.json"))
    decoder = json.JSONDecoder()

    def closes(text: str) -> bool:
        try:
            decoder.raw_decode(text)
        except ValueError:
            return False
        return True

    assert not any(closes('{"n": ' + tokenizer.decode([i])) for i in range(tokenizer.get_vocab_size()))
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "count", "schema": schema}}
    response = openai_client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Count the planets as JSON."}],
                                                     response_format=fmt, max_tokens=1, **GREEDY)
    choice = response.choices[0]
    assert choice.finish_reason == "length" and choice.message.content.startswith('{"n": ')
    assert response.usage.completion_tokens >= 1


CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
               "required": ["city", "country"]}


def test_json_schema_mode_validates(openai_client):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}}
    messages = [{"role": "user", "content": "Give the city and country of the capital of France."}]
    kwargs = dict(model="smollm2", messages=messages, response_format=fmt, max_tokens=100, seed=7, **GREEDY)
    response = openai_client.chat.completions.create(**kwargs)
    streamed = "".join(c.choices[0].delta.content or "" for c in openai_client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    content = response.choices[0].message.content
    assert streamed == content
    if response.choices[0].finish_reason == "length":
        assert content.startswith('{"city": "')
    else:
        assert response.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(content), CITY_SCHEMA)


IMPOSSIBLE = {"type": "object", "properties": {"year": {"type": "integer", "minimum": 1, "maximum": 0}}, "required": ["year"]}


@pytest.mark.parametrize("schema, words", [(IMPOSSIBLE, "Unsatisfiable"), ({"type": "array", "uniqueItems": True}, "uniqueItems")])
def test_json_schema_the_matcher_cannot_enforce_is_400(api_server, schema, words):
    # No value meets the first schema; the matcher does not implement the second's keyword. Either is refused up
    # front, naming why, rather than served unconstrained.
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    payload = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "response_format": fmt, "max_tokens": 5}
    response = requests.post(api_server.base + "/v1/chat/completions", json=payload, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "response_format.json_schema.schema" and words in error["message"]


# ----------------------------------------------------------------------------- Anthropic


def _anthropic_answer(anthropic_client, block: dict, result):
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": [block]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block["id"], "content": result}]}]
    return anthropic_client.messages.create(model="smollm2", max_tokens=60, messages=messages, tools=[WEATHER_ANTHROPIC],
                                            tool_choice={"type": "none"}, extra_body=GREEDY)


def test_anthropic_forced_weather_round_trip(anthropic_client):
    messages = [{"role": "user", "content": QUESTION}]
    first = anthropic_client.messages.create(model="smollm2", max_tokens=100, messages=messages, tools=[WEATHER_ANTHROPIC],
                                             tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY)
    assert first.stop_reason == "tool_use"
    (made,) = first.content
    assert made.type == "tool_use" and made.id.startswith("toolu_") and made.name == "get_weather"
    jsonschema.validate(made.input, WEATHER_SCHEMA)
    usage = first.usage  # the prompt: what the prompt cache read or wrote (the tool prompt is held) plus the rest
    assert usage.input_tokens + (usage.cache_read_input_tokens or 0) + (usage.cache_creation_input_tokens or 0) == \
        anthropic_client.messages.count_tokens(model="smollm2", messages=messages, tools=[WEATHER_ANTHROPIC]).input_tokens
    block = made.model_dump()

    final, other = _anthropic_answer(anthropic_client, block, RESULT), _anthropic_answer(anthropic_client, block, OTHER_RESULT)
    assert [b.type for b in final.content] == ["text"]
    ended_consistently(final.stop_reason, final.usage.output_tokens, 60, natural=("end_turn",), cut="max_tokens")
    assert other.usage.input_tokens > final.usage.input_tokens  # the tool's result is in the prompt


def test_anthropic_forced_weather_round_trip_streamed(anthropic_client):
    messages = [{"role": "user", "content": QUESTION}]
    kwargs = dict(model="smollm2", max_tokens=100, messages=messages, tools=[WEATHER_ANTHROPIC], tool_choice={"type": "any"},
                  extra_body=GREEDY)

    def stream_call():
        with anthropic_client.messages.stream(**kwargs) as stream:
            return list(stream), stream.get_final_message()

    streamed = stream_call()
    whole = anthropic_client.messages.create(**kwargs)
    events, first = streamed
    partials = [e.delta.partial_json for e in events if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    assert len(partials) > 1 and json.loads("".join(partials)) == whole.content[0].input
    assert not [e for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta"]
    assert first.stop_reason == "tool_use" and first.content[0].input == whole.content[0].input
    jsonschema.validate(first.content[0].input, WEATHER_SCHEMA)
    block = first.content[0].model_dump()

    messages = messages + [{"role": "assistant", "content": [block]},
                           {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block["id"],
                                                         "content": [{"type": "text", "text": RESULT}]}]}]
    with anthropic_client.messages.stream(model="smollm2", max_tokens=60, messages=messages, tools=[WEATHER_ANTHROPIC],
                                          tool_choice={"type": "none"}, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    alone = _anthropic_answer(anthropic_client, block, [{"type": "text", "text": RESULT}])
    assert final.content[0].text == text == alone.content[0].text
    ended_consistently(final.stop_reason, final.usage.output_tokens, 60, natural=("end_turn",), cut="max_tokens")


@pytest.mark.parametrize("body,fragment", [
    ({"tools": [WEATHER_ANTHROPIC], "tool_choice": {"type": "tool", "name": "nope"}}, "not among the request's tools"),
    ({"tools": [{"name": "x", "input_schema": {"type": 3}}]}, "tools[0].input_schema"),
    ({"tools": [{"name": "x"}]}, "tools[0].input_schema"),
    ({"tool_choice": {"type": "any"}}, "no tools were given"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "18"}]}]},
     "no earlier assistant turn made a call with that id"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "content": "18"}]}]}, "tool_use_id"),
])
def test_anthropic_bad_tool_requests_are_400(api_server, body, fragment):
    payload = {"model": "smollm2", "max_tokens": 5, "messages": [{"role": "user", "content": QUESTION}], **body}
    response = requests.post(api_server.base + "/v1/messages", json=payload, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["type"] == "error" and response.json()["error"]["type"] == "invalid_request_error"
    assert fragment in response.json()["error"]["message"]


def test_tool_error_results_reach_the_prompt(anthropic_client):
    base = [{"role": "user", "content": QUESTION},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]}]
    counts = []
    for is_error in (False, True):
        result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "service down", "is_error": is_error}
        counts.append(anthropic_client.messages.count_tokens(model="smollm2", tools=[WEATHER_ANTHROPIC],
                                                             messages=base + [{"role": "user", "content": [result]}]).input_tokens)
    assert counts[0] != counts[1]


# ----------------------------------------------------------------------------- reasoning, simulated by a chat template
# SmolLM2 with a template that opens <think> and shows one worked example, the way Qwen3 / R1 templates open it.
THINKING_TEMPLATE = (
    "{{ '<|im_start|>user\\nWhat is 2+2?<|im_end|>\\n<|im_start|>assistant\\n<think>\\nTwo plus two makes four.\\n</think>\\n"
    "The answer is 4.<|im_end|>\\n' }}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}"
)
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def _thinking_server(default_model_dir, folder, reasoning: bool):
    from servers import gunicorn

    template = folder / "thinking.jinja"
    template.write_text(THINKING_TEMPLATE)
    env = {"LLM_MODEL_PATH": default_model_dir, "LLM_MODEL_ID": "thinker", "LLM_EAGER_LOAD": "1",
           "LLM_CHAT_TEMPLATE": str(template), "LLM_INTER_THREADS": "1", "LLM_REASONING": "1" if reasoning else "0"}
    return gunicorn("wsgi:app", env, str(folder / "server.log"), "/v1/models")


@pytest.fixture(scope="module")
def thinking_server(default_model_dir, tmp_path_factory):
    with _thinking_server(default_model_dir, tmp_path_factory.mktemp("thinking"), reasoning=True) as server:
        yield server


@pytest.fixture(scope="module")
def raw_thinking(default_model_dir, tmp_path_factory):
    """What the model writes after the template's opening <think>, unsplit (LLM_REASONING off): (reasoning, closed, answer).
    The tests derive what the split must look like from it instead of pinning this machine's greedy text."""
    with _thinking_server(default_model_dir, tmp_path_factory.mktemp("raw-thinking"), reasoning=False) as server:
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="x", max_retries=0)
        message = client.chat.completions.create(model="thinker", messages=FRANCE, max_tokens=60, **GREEDY).choices[0].message
    assert getattr(message, "reasoning_content", None) is None
    head, sep, tail = message.content.partition("</think>")
    return head.strip(), bool(sep), tail.strip(), message.content


def test_reasoning_content_on_openai(thinking_server, raw_thinking):
    reasoning, closed, answer, _ = raw_thinking
    client = openai.OpenAI(base_url=thinking_server.base + "/v1", api_key="x", max_retries=0)
    message = client.chat.completions.create(model="thinker", messages=FRANCE, max_tokens=60, **GREEDY).choices[0].message
    assert message.reasoning_content.strip() == reasoning
    assert (message.content or "").strip() == answer and "think>" not in (message.content or "")
    chunks = list(client.chat.completions.create(model="thinker", messages=FRANCE, max_tokens=60, stream=True, **GREEDY))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == message.reasoning_content
    assert "".join(d.content or "" for d in deltas) == (message.content or "")


def test_thinking_blocks_on_anthropic(thinking_server, raw_thinking):
    reasoning, closed, answer, _ = raw_thinking
    client = anthropic.Anthropic(base_url=thinking_server.base, api_key="x", max_retries=0)
    kwargs = dict(model="thinker", max_tokens=60, messages=FRANCE, extra_body=GREEDY)
    message = client.messages.create(thinking={"type": "enabled", "budget_tokens": 1024}, **kwargs)
    assert [b.type for b in message.content] == ["thinking"] + (["text"] if answer else [])
    assert message.content[0].thinking.strip() == reasoning and message.content[0].signature
    if answer:
        assert message.content[1].text.strip() == answer

    with client.messages.stream(thinking={"type": "enabled", "budget_tokens": 1024}, **kwargs) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [e.delta.type for e in events if e.type == "content_block_delta"]
    assert kinds.index("signature_delta") > kinds.index("thinking_delta")
    assert (kinds[-1] == "text_delta") == bool(answer)
    assert final.content[0].thinking == message.content[0].thinking
    assert final.content[0].signature == message.content[0].signature
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in message.content]

    # Thinking not asked for: the API returns no thinking blocks, and no <think> markup either.
    plain = client.messages.create(**kwargs)
    assert [b.type for b in plain.content] == (["text"] if answer else [])
    assert "".join(b.text for b in plain.content).strip() == answer
    # Replaying the thinking block in the next turn is accepted.
    follow = FRANCE + [{"role": "assistant", "content": [b.model_dump() for b in message.content]},
                       {"role": "user", "content": "And of Italy?"}]
    assert client.messages.create(thinking={"type": "enabled", "budget_tokens": 1024}, model="thinker", max_tokens=40,
                                  messages=follow, extra_body=GREEDY).stop_reason in ("end_turn", "max_tokens")


def test_reasoning_can_be_switched_off(thinking_server, raw_thinking):
    # Off (raw_thinking's server), the text is left whole: the same reasoning, the closing tag and the answer that the
    # server with reasoning on splits apart.
    *_, raw = raw_thinking
    client = openai.OpenAI(base_url=thinking_server.base + "/v1", api_key="x", max_retries=0)
    split = client.chat.completions.create(model="thinker", messages=FRANCE, max_tokens=60, **GREEDY).choices[0].message
    closing = "</think>" if "</think>" in raw else ""
    assert "".join(raw.split()) == "".join((split.reasoning_content + closing + (split.content or "")).split())
