"""Tool calling, JSON output and reasoning through the official SDKs against gunicorn -k gevent, default model.

SmolLM2-135M was never trained on tool use; these tests pin what the server
guarantees whatever the model (a forced call is a real, schema-valid call;
no markup leaks; JSON answers validate or fail loudly), and the greedy
outputs it gives with this model.
"""

from __future__ import annotations

import json
import os

import anthropic
import jsonschema
import openai
import pytest
import requests

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


# ----------------------------------------------------------------------------- OpenAI
def test_openai_forced_weather_round_trip(openai_client):
    messages = [{"role": "user", "content": QUESTION}]
    first = openai_client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER], tool_choice=FORCED,
                                                  max_tokens=60, **GREEDY)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER_SCHEMA)
    assert arguments["city"] == "Paris"

    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": RESULT}]
    final = openai_client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER], tool_choice="none",
                                                  max_tokens=60, **GREEDY)
    answer = final.choices[0]
    assert answer.finish_reason == "stop" and not answer.message.tool_calls
    assert "18" in answer.message.content  # the model read the tool's result


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
    chunks, text, calls, firsts, finish = _stream_chat(openai_client, messages=messages, tools=[WEATHER], tool_choice=FORCED,
                                                       max_tokens=60, **GREEDY)
    assert text == "" and finish == ["tool_calls"]
    assert firsts[0].id.startswith("call_") and firsts[0].type == "function" and firsts[0].function.arguments == ""
    fragments = [d.function.arguments for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])][1:]
    assert len(fragments) > 1  # arguments arrive in pieces, as generated
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}

    messages += [{"role": "assistant", "content": None, "tool_calls": [
        {"id": calls[0]["id"], "type": "function", "function": {"name": "get_weather", "arguments": calls[0]["arguments"]}}]},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": RESULT}]
    with openai_client.chat.completions.stream(model="smollm2", messages=messages, tools=[WEATHER], tool_choice="none",
                                               max_tokens=60, **GREEDY) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "stop" and "18" in final.choices[0].message.content


def test_openai_stream_helper_accumulates_the_call(openai_client):
    with openai_client.chat.completions.stream(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                               tools=[WEATHER], tool_choice="required", max_tokens=60, **GREEDY) as stream:
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


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
    # choice is the tool CTranslate2 scores likeliest. A 422 (arguments the model could not write) names the tool too.
    for question in (QUESTION, "What time is it in Tokyo right now?"):
        expected, scores = _likeliest_tool(default_model_dir, question, [WEATHER, TIME])
        try:
            response = openai_client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": question}],
                                                             tools=[WEATHER, TIME], tool_choice="required", max_tokens=200,
                                                             **GREEDY)
        except openai.UnprocessableEntityError as error:
            assert f"arguments for tool {expected!r}" in error.message, scores
            continue
        call = response.choices[0].message.tool_calls[0]
        assert call.function.name == expected, scores
        assert isinstance(json.loads(call.function.arguments), dict)


def test_openai_tool_choice_none_yields_text(openai_client):
    response = openai_client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                                     tools=[WEATHER], tool_choice="none", max_tokens=30, **GREEDY)
    message = response.choices[0].message
    assert not message.tool_calls and message.content and response.choices[0].finish_reason in ("stop", "length")
    assert "<tool_call>" not in message.content


def test_openai_auto_text_never_carries_markup(openai_client):
    _, text, calls, _, finish = _stream_chat(openai_client, messages=[{"role": "user", "content": QUESTION}], tools=[WEATHER],
                                             max_tokens=80, **GREEDY)
    assert "<tool_call>" not in text and "</tool_call>" not in text
    assert finish == (["tool_calls"] if calls else finish)


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
    for stream in (False, True):
        kwargs = dict(model="smollm2", messages=[{"role": "user", "content": question}],
                      response_format={"type": "json_object"}, max_tokens=100, **GREEDY)
        if stream:
            content = "".join(c.choices[0].delta.content or "" for c in openai_client.chat.completions.create(stream=True, **kwargs)
                              if c.choices)
        else:
            content = openai_client.chat.completions.create(**kwargs).choices[0].message.content
        assert isinstance(json.loads(content), dict)


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
    response = openai_client.chat.completions.create(model="smollm2", messages=messages, response_format=fmt, max_tokens=100, **GREEDY)
    value = json.loads(response.choices[0].message.content)
    jsonschema.validate(value, CITY_SCHEMA)
    assert response.choices[0].finish_reason == "stop"
    chunks = openai_client.chat.completions.create(model="smollm2", messages=messages, response_format=fmt, max_tokens=100,
                                                   stream=True, **GREEDY)
    assert json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)) == value


IMPOSSIBLE = {"type": "object", "properties": {"year": {"type": "integer", "minimum": 1000000}}, "required": ["year"]}


def test_json_schema_the_model_cannot_meet_fails_clearly(openai_client):
    fmt = {"type": "json_schema", "json_schema": {"name": "code", "schema": IMPOSSIBLE}}
    messages = [{"role": "user", "content": "In which year did the French Revolution begin?"}]
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        openai_client.chat.completions.create(model="smollm2", messages=messages, response_format=fmt, max_tokens=40, seed=1,
                                              **GREEDY)
    assert caught.value.status_code == 422 and "valid JSON output in 3 attempt(s)" in caught.value.message
    with pytest.raises(openai.APIError, match="did not produce valid JSON output"):
        list(openai_client.chat.completions.create(model="smollm2", messages=messages, response_format=fmt, max_tokens=40,
                                                   seed=1, stream=True, **GREEDY))


# ----------------------------------------------------------------------------- Anthropic
def test_anthropic_forced_weather_round_trip(anthropic_client):
    messages = [{"role": "user", "content": QUESTION}]
    first = anthropic_client.messages.create(model="smollm2", max_tokens=60, messages=messages, tools=[WEATHER_ANTHROPIC],
                                             tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY)
    assert first.stop_reason == "tool_use"
    (block,) = first.content
    assert block.type == "tool_use" and block.id.startswith("toolu_") and block.name == "get_weather"
    assert block.input == {"city": "Paris"}
    assert first.usage.input_tokens == anthropic_client.messages.count_tokens(
        model="smollm2", messages=messages, tools=[WEATHER_ANTHROPIC]).input_tokens

    messages += [{"role": "assistant", "content": [block.model_dump()]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id, "content": RESULT}]}]
    final = anthropic_client.messages.create(model="smollm2", max_tokens=60, messages=messages, tools=[WEATHER_ANTHROPIC],
                                             tool_choice={"type": "none"}, extra_body=GREEDY)
    assert final.stop_reason == "end_turn" and [b.type for b in final.content] == ["text"]
    assert "18" in final.content[0].text


def test_anthropic_forced_weather_round_trip_streamed(anthropic_client):
    messages = [{"role": "user", "content": QUESTION}]
    with anthropic_client.messages.stream(model="smollm2", max_tokens=60, messages=messages, tools=[WEATHER_ANTHROPIC],
                                          tool_choice={"type": "any"}, extra_body=GREEDY) as stream:
        events = list(stream)
        first = stream.get_final_message()
    partials = [e.delta.partial_json for e in events if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    assert len(partials) > 1 and json.loads("".join(partials)) == {"city": "Paris"}
    assert not [e for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta"]
    assert first.stop_reason == "tool_use" and first.content[0].input == {"city": "Paris"}

    messages += [{"role": "assistant", "content": [first.content[0].model_dump()]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": first.content[0].id,
                                               "content": [{"type": "text", "text": RESULT}]}]}]
    with anthropic_client.messages.stream(model="smollm2", max_tokens=60, messages=messages, tools=[WEATHER_ANTHROPIC],
                                          tool_choice={"type": "none"}, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.stop_reason == "end_turn" and "18" in text and final.content[0].text == text


@pytest.mark.parametrize("body,fragment", [
    ({"tools": [WEATHER_ANTHROPIC], "tool_choice": {"type": "tool", "name": "nope"}}, "not among the request's tools"),
    ({"tools": [{"name": "x", "input_schema": {"type": 3}}]}, "tools[0].input_schema"),
    ({"tools": [{"name": "x"}]}, "tools[0].input_schema"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools"),
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


@pytest.fixture(scope="module")
def thinking_server(default_model_dir, tmp_path_factory):
    from servers import gunicorn

    folder = tmp_path_factory.mktemp("thinking")
    template = folder / "thinking.jinja"
    template.write_text(THINKING_TEMPLATE)
    env = {"LLM_MODEL_PATH": default_model_dir, "LLM_MODEL_ID": "thinker", "LLM_EAGER_LOAD": "1",
           "LLM_CHAT_TEMPLATE": str(template), "LLM_INTER_THREADS": "1"}
    with gunicorn("wsgi:app", env, str(folder / "server.log"), "/v1/models") as server:
        yield server


def test_reasoning_content_on_openai(thinking_server):
    client = openai.OpenAI(base_url=thinking_server.base + "/v1", api_key="x", max_retries=0)
    message = client.chat.completions.create(model="thinker", messages=FRANCE, max_tokens=60, **GREEDY).choices[0].message
    assert message.reasoning_content.strip() == "The capital of France is Paris."
    assert message.content == "The answer is Paris."
    chunks = list(client.chat.completions.create(model="thinker", messages=FRANCE, max_tokens=60, stream=True, **GREEDY))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert reasoning == message.reasoning_content
    assert "".join(d.content or "" for d in deltas) == "The answer is Paris."
    assert "think>" not in "".join(d.content or "" for d in deltas)


def test_thinking_blocks_on_anthropic(thinking_server):
    client = anthropic.Anthropic(base_url=thinking_server.base, api_key="x", max_retries=0)
    kwargs = dict(model="thinker", max_tokens=60, messages=FRANCE, extra_body=GREEDY)
    message = client.messages.create(thinking={"type": "enabled", "budget_tokens": 1024}, **kwargs)
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking.strip() == "The capital of France is Paris." and message.content[0].signature
    assert message.content[1].text == "The answer is Paris."

    with client.messages.stream(thinking={"type": "enabled", "budget_tokens": 1024}, **kwargs) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [e.delta.type for e in events if e.type == "content_block_delta"]
    assert kinds.index("signature_delta") > kinds.index("thinking_delta") and kinds[-1] == "text_delta"
    assert final.content[0].thinking == message.content[0].thinking
    assert final.content[0].signature == message.content[0].signature
    assert final.content[1].text == "The answer is Paris."

    # Thinking not asked for: the API returns no thinking blocks, and no <think> markup either.
    plain = client.messages.create(**kwargs)
    assert [b.type for b in plain.content] == ["text"] and plain.content[0].text == "The answer is Paris."
    # Replaying the thinking block in the next turn is accepted.
    follow = FRANCE + [{"role": "assistant", "content": [b.model_dump() for b in message.content]},
                       {"role": "user", "content": "And of Italy?"}]
    assert client.messages.create(thinking={"type": "enabled", "budget_tokens": 1024}, model="thinker", max_tokens=40,
                                  messages=follow, extra_body=GREEDY).stop_reason in ("end_turn", "max_tokens")


def test_reasoning_can_be_switched_off(default_model_dir, tmp_path):
    from servers import gunicorn

    template = tmp_path / "thinking.jinja"
    template.write_text(THINKING_TEMPLATE)
    env = {"LLM_MODEL_PATH": default_model_dir, "LLM_MODEL_ID": "thinker", "LLM_EAGER_LOAD": "1",
           "LLM_CHAT_TEMPLATE": str(template), "LLM_REASONING": "0", "LLM_INTER_THREADS": "1"}
    with gunicorn("wsgi:app", env, str(tmp_path / "server.log"), "/v1/models") as server:
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="x", max_retries=0)
        message = client.chat.completions.create(model="thinker", messages=FRANCE, max_tokens=60, **GREEDY).choices[0].message
    assert getattr(message, "reasoning_content", None) is None
    assert message.content == "The capital of France is Paris.\n</think>\nThe answer is Paris."
    assert os.path.exists(template)
