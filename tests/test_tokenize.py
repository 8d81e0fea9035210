"""/tokenize and /detokenize: raw text and the chat-template form, counted exactly as generation counts them."""

from __future__ import annotations

import requests

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the weather",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def _post(server, path, body):
    return requests.post(server.base + path, json=body, timeout=60)


def test_raw_text_counts_as_completions_do_and_round_trips(api_server, openai_client):
    prompt = "Once upon a time, in a land far away"
    tokenized = _post(api_server, "/tokenize", {"model": "smollm2", "prompt": prompt, "return_token_strs": True}).json()
    usage = openai_client.completions.create(model="smollm2", prompt=prompt, max_tokens=1).usage
    assert tokenized["count"] == len(tokenized["tokens"]) == usage.prompt_tokens
    assert tokenized["max_model_len"] > 0 and len(tokenized["token_strs"]) == tokenized["count"]
    assert _post(api_server, "/detokenize", {"model": "smollm2", "tokens": tokenized["tokens"]}).json() == {"prompt": prompt}
    llama_cpp_style = _post(api_server, "/tokenize", {"content": prompt}).json()  # llama.cpp's field name, no model
    assert llama_cpp_style["tokens"] == tokenized["tokens"]


def test_chat_form_counts_what_the_chat_route_prefills(api_server, openai_client):
    for extra in ({}, {"tools": [WEATHER]}, {"tools": [WEATHER], "tool_choice": "none"},
                  {"response_format": {"type": "json_object"}}):
        tokenized = _post(api_server, "/tokenize", {"model": "smollm2", "messages": FRANCE, **extra}).json()
        usage = openai_client.chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=1, **extra).usage
        assert tokenized["count"] == usage.prompt_tokens, extra
    plain = _post(api_server, "/tokenize", {"messages": FRANCE}).json()
    rendered = _post(api_server, "/detokenize", {"tokens": plain["tokens"]}).json()["prompt"]
    assert "What is the capital of France?" in rendered


def test_bad_requests_are_openai_errors(api_server):
    cases = [
        ("/tokenize", {"prompt": "a", "messages": FRANCE}, 400, "prompt"),
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
        ("/detokenize", {"tokens": [10 ** 9]}, 400, "tokens"),
        ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
        ("/tokenize", {"model": "gpt-4o", "prompt": "a"}, 404, None),
    ]
    for path, body, status, param in cases:
        response = _post(api_server, path, body)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert error["message"] and (param is None or error["param"] == param), (body, error)


def test_documented_in_the_openapi_document(api_server):
    paths = requests.get(api_server.base + "/openapi.json", timeout=10).json()["paths"]
    assert "post" in paths["/tokenize"] and "post" in paths["/detokenize"]
