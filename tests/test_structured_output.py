"""Structured output is guaranteed: varied JSON Schemas and forced tool calls, greedy and sampled, streamed and not,
through the official SDKs against gunicorn -k gevent with the default model. Every answer validates; none is a 422.

The requests run concurrently against the one session server (the engine batches them), so the whole grid takes
about as long as a few answers in a row.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
from outcomes import wait_idle

NAME = {"type": "string", "minLength": 1, "maxLength": 20}

SCHEMAS: dict[str, tuple[str, dict]] = {
    "enum": ("Is Paris in France?", {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "unsure"]}},
                                     "required": ["answer"], "additionalProperties": False}),
    "integer range": ("How many continents are there?", {
        "type": "object", "properties": {"count": {"type": "integer", "minimum": 1, "maximum": 10}}, "required": ["count"]}),
    "number bounds": ("How sure are you that water is wet, from 0 to 1?", {
        "type": "object", "properties": {"confidence": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}},
        "required": ["confidence"]}),
    "boolean and string": ("Is the sun a star? Explain briefly.", {
        "type": "object", "properties": {"is_star": {"type": "boolean"}, "why": {"type": "string", "maxLength": 60}},
        "required": ["is_star", "why"]}),
    "nested object": ("Describe the Eiffel Tower.", {
        "type": "object", "required": ["name", "location"], "properties": {
            "name": NAME, "location": {"type": "object", "required": ["city", "country"],
                                       "properties": {"city": NAME, "country": NAME}, "additionalProperties": False}}}),
    "array bounds": ("List some primary colours.", {
        "type": "object", "properties": {"colours": {"type": "array", "items": NAME, "minItems": 2, "maxItems": 3}},
        "required": ["colours"]}),
    "array of objects": ("Name two planets and their order from the sun.", {
        "type": "object", "required": ["planets"], "properties": {"planets": {
            "type": "array", "minItems": 1, "maxItems": 2, "items": {
                "type": "object", "required": ["name", "order"],
                "properties": {"name": NAME, "order": {"type": "integer", "minimum": 1, "maximum": 8}}}}}}),
    "optional keys": ("Describe a cat.", {
        "type": "object", "required": ["animal"],
        "properties": {"animal": NAME, "legs": {"type": "integer", "minimum": 0, "maximum": 8}, "colour": NAME}}),
    "pattern": ("What is the airport code of Paris Charles de Gaulle?", {
        "type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["code"]}),
    "date format": ("When did the French Revolution begin?", {
        "type": "object", "properties": {"date": {"type": "string", "format": "date"}}, "required": ["date"]}),
    "email format": ("Make up an email address for a support desk.", {
        "type": "object", "properties": {"email": {"type": "string", "format": "email", "maxLength": 40}},
        "required": ["email"]}),
    "uuid format": ("Make up an order id.", {
        "type": "object", "properties": {"order_id": {"type": "string", "format": "uuid"}}, "required": ["order_id"]}),
    "anyOf union": ("What is the answer to everything?", {
        "type": "object", "required": ["answer"],
        "properties": {"answer": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 1000}, {"type": "string", "maxLength": 20}]}}}),
    "nullable": ("Who was the first person on Mars?", {
        "type": "object", "properties": {"person": {"type": ["string", "null"], "maxLength": 30}}, "required": ["person"]}),
    "const and enum": ("Classify the word 'run'.", {
        "type": "object", "required": ["kind", "part_of_speech"], "properties": {
            "kind": {"const": "word"}, "part_of_speech": {"enum": ["noun", "verb", "adjective"]}}}),
    "refs and defs": ("Describe a person with an address.", {
        "$defs": {"address": {"type": "object", "properties": {"street": NAME, "city": NAME}, "required": ["city"]}},
        "type": "object", "properties": {"name": NAME, "home": {"$ref": "#/$defs/address"}}, "required": ["name", "home"]}),
    "oneOf objects": ("Give a shape.", {
        "type": "object", "required": ["shape"], "properties": {"shape": {"oneOf": [
            {"type": "object", "properties": {"kind": {"const": "circle"}, "radius": {"type": "integer", "minimum": 1, "maximum": 9}},
             "required": ["kind", "radius"], "additionalProperties": False},
            {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1, "maximum": 9}},
             "required": ["kind", "side"], "additionalProperties": False}]}}}),
    "top-level array": ("List three fruits.", {"type": "array", "items": {"type": "string", "maxLength": 15},
                                               "minItems": 3, "maxItems": 3}),
    "string length": ("Give a two-letter country code for France.", {
        "type": "object", "properties": {"code": {"type": "string", "minLength": 2, "maxLength": 2}}, "required": ["code"]}),
    "json object": ("Give the name and country of the capital of France as a JSON object.", {"type": "object"}),
}

GRID = [(name, temperature, stream) for name in SCHEMAS for temperature in (0.0, 1.0) for stream in (False, True)]


@pytest.fixture(autouse=True)
def _served_alone(api_server):
    wait_idle(api_server.base)


def _chat_json(client, name: str, temperature: float, stream: bool) -> tuple[str, str]:
    question, schema = SCHEMAS[name]
    fmt = {"type": "json_object"} if name == "json object" else \
        {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    kwargs = dict(model="smollm2", messages=[{"role": "user", "content": question}], response_format=fmt,
                  max_tokens=200, temperature=temperature)
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        return choice.message.content, choice.finish_reason
    chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason


def test_twenty_schemas_always_validate(openai_client):
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda case: (case, _chat_json(openai_client, *case)), GRID))
    failures = []
    for (name, temperature, stream), (text, finish) in results:
        try:
            assert finish == "stop", finish
            jsonschema.validate(json.loads(text), SCHEMAS[name][1], format_checker=jsonschema.FormatChecker())
        except (AssertionError, ValueError, jsonschema.ValidationError) as error:
            failures.append(f"{name} t={temperature} stream={stream}: {error} in {text!r}")
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- forced tool calls
BOOKING = {"type": "object", "additionalProperties": False, "required": ["guest", "nights", "room", "extras"], "properties": {
    "guest": {"type": "object", "required": ["name", "email"], "properties": {
        "name": NAME, "email": {"type": "string", "format": "email", "maxLength": 40}}},
    "nights": {"type": "integer", "minimum": 1, "maximum": 14},
    "room": {"enum": ["single", "double", "suite"]},
    "extras": {"type": "array", "items": {"enum": ["breakfast", "parking", "late checkout"]}, "maxItems": 2},
    "notes": {"type": ["string", "null"], "maxLength": 40}}}
SEARCH = {"type": "object", "required": ["query", "filters"], "properties": {
    "query": {"type": "string", "maxLength": 40},
    "filters": {"type": "array", "minItems": 1, "maxItems": 2, "items": {"anyOf": [
        {"type": "object", "properties": {"field": {"const": "price"}, "max": {"type": "number", "minimum": 0, "maximum": 1000}},
         "required": ["field", "max"]},
        {"type": "object", "properties": {"field": {"const": "colour"}, "value": NAME}, "required": ["field", "value"]}]}}}}
TOOLS = {"book_room": ("Book a double room for two nights for Ann (ann@example.com).", BOOKING),
         "search_products": ("Find red shoes under 100 euros.", SEARCH)}
# Each tool greedy and whole, and sampled and streamed, on each API.
CALL_GRID = [(name, temperature, stream) for name in TOOLS for temperature, stream in ((0.0, False), (1.0, True))]


def _openai_call(client, name: str, temperature: float, stream: bool) -> tuple[str, str, str]:
    tools = [{"type": "function", "function": {"name": n, "description": f"{n.replace('_', ' ')}", "parameters": s}}
             for n, (_, s) in TOOLS.items()]
    kwargs = dict(model="smollm2", messages=[{"role": "user", "content": TOOLS[name][0]}], tools=tools,
                  tool_choice={"type": "function", "function": {"name": name}}, max_tokens=250, temperature=temperature)
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        call = choice.message.tool_calls[0]
        return call.function.name, call.function.arguments, choice.finish_reason
    with client.chat.completions.stream(**kwargs) as events:
        choice = events.get_final_completion().choices[0]
    call = choice.message.tool_calls[0]
    return call.function.name, call.function.arguments, choice.finish_reason


def _anthropic_call(client, name: str, temperature: float, stream: bool) -> tuple[str, str, str]:
    tools = [{"name": n, "description": n.replace("_", " "), "input_schema": s} for n, (_, s) in TOOLS.items()]
    kwargs = dict(model="smollm2", max_tokens=250, messages=[{"role": "user", "content": TOOLS[name][0]}], tools=tools,
                  tool_choice={"type": "tool", "name": name}, extra_body={"temperature": temperature})
    if not stream:
        message = client.messages.create(**kwargs)
    else:
        with client.messages.stream(**kwargs) as events:
            message = events.get_final_message()
    (block,) = message.content
    return block.name, json.dumps(block.input), message.stop_reason


def test_forced_calls_with_complex_arguments_always_validate(openai_client, anthropic_client):
    # Long prompts (two tools' schemas) and several resumes per call: each resume re-prefills its batch, so these
    # run four at a time with a generous timeout.
    openai_client, anthropic_client = openai_client.with_options(timeout=600), anthropic_client.with_options(timeout=600)
    jobs = [(_openai_call, openai_client, case) for case in CALL_GRID] + [(_anthropic_call, anthropic_client, case) for case in CALL_GRID]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda job: (job, job[0](job[1], *job[2])), jobs))
    failures = []
    for (call, _, (name, temperature, stream)), (called, arguments, finish) in results:
        try:
            assert called == name and finish in ("tool_calls", "tool_use"), (called, finish)
            jsonschema.validate(json.loads(arguments), TOOLS[name][1], format_checker=jsonschema.FormatChecker())
        except (AssertionError, ValueError, jsonschema.ValidationError) as error:
            failures.append(f"{call.__name__} {name} t={temperature} stream={stream}: {error} in {arguments!r}")
    assert not failures, "\n".join(failures)


def test_required_with_several_tools_calls_one_of_them(openai_client, anthropic_client):
    tools = [{"type": "function", "function": {"name": n, "parameters": s}} for n, (_, s) in TOOLS.items()]
    response = openai_client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": TOOLS["book_room"][0]}],
                                                     tools=tools, tool_choice="required", max_tokens=250, temperature=1.0)
    call = response.choices[0].message.tool_calls[0]
    assert call.function.name in TOOLS
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[call.function.name][1])
    message = anthropic_client.messages.create(
        model="smollm2", max_tokens=250, messages=[{"role": "user", "content": TOOLS["search_products"][0]}],
        tools=[{"name": n, "input_schema": s} for n, (_, s) in TOOLS.items()], tool_choice={"type": "any"},
        extra_body={"temperature": 1.0})
    (block,) = message.content
    assert block.name in TOOLS and message.stop_reason == "tool_use"
    jsonschema.validate(block.input, TOOLS[block.name][1])
