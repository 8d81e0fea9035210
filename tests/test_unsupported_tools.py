"""Tools this server cannot run do not fail an agent's turn: left out of what the model sees and named in the
LLM-Omitted-Tools header (LLM_UNSUPPORTED_TOOLS=omit, the default), or a clear 400 (reject). Codex's namespace
tools are served: their functions are offered under Codex's wire names and answered with namespace and name apart.

Tool lists as Codex CLI 0.171 and Claude Code 2.1.197 send them (function tools beside hosted/server tools).
"""

from __future__ import annotations

import json

import requests
from flask import Flask

from llm_blueprint import LLM

ECHO = {"type": "function", "name": "echo", "description": "Repeat a word.", "strict": False,
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}
SHELL = {"type": "function", "name": "shell", "description": "Run a command.",
         "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}
CODEX_TOOLS = [SHELL, {"type": "web_search"}, {"type": "image_generation"},
               {"type": "namespace", "name": "mcp__demo__", "description": "A demo MCP server.", "tools": [ECHO]}]
QUESTION = "Repeat the word banana."


def _responses(api_server, body):
    return requests.post(api_server.base + "/v1/responses", json={"model": "smollm2", "input": QUESTION,
                                                                   "max_output_tokens": 40, "temperature": 0, **body},
                         timeout=120)


def test_codex_tool_list_is_served_hosted_tools_omitted_and_named(api_server):
    response = _responses(api_server, {"tools": CODEX_TOOLS, "tool_choice": {"type": "function", "name": "mcp__demo__echo"}})
    assert response.status_code == 200, response.text
    assert response.headers["LLM-Omitted-Tools"] == "web_search, image_generation"
    (call,) = [item for item in response.json()["output"] if item["type"] == "function_call"]
    assert call["namespace"] == "mcp__demo__" and call["name"] == "echo"  # as Codex reads a namespaced call
    assert isinstance(json.loads(call["arguments"])["word"], str)
    # Codex sends the call back with its namespace, then the tool's output: the turn goes on
    history = [{"role": "user", "content": QUESTION}, {k: call[k] for k in ("type", "call_id", "name", "namespace", "arguments")},
               {"type": "function_call_output", "call_id": call["call_id"], "output": "banana"}]
    follow = _responses(api_server, {"input": history, "tools": CODEX_TOOLS, "tool_choice": "none"})
    assert follow.status_code == 200, follow.text
    assert follow.json()["output"][0]["type"] == "message"


def test_codex_streamed_namespaced_call(api_server):
    response = _responses(api_server, {"tools": CODEX_TOOLS, "tool_choice": {"type": "function", "name": "mcp__demo__echo"},
                                       "stream": True})
    assert response.status_code == 200 and response.headers["LLM-Omitted-Tools"] == "web_search, image_generation"
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    done = [e["item"] for e in events if e["type"] == "response.output_item.done" and e["item"]["type"] == "function_call"]
    assert done and done[0]["namespace"] == "mcp__demo__" and done[0]["name"] == "echo"
    assert events[-1]["type"] == "response.completed"


def test_chat_completions_and_anthropic_omit_what_they_cannot_run(api_server):
    chat = requests.post(api_server.base + "/v1/chat/completions", timeout=120, json={
        "model": "smollm2", "max_tokens": 8, "messages": [{"role": "user", "content": QUESTION}],
        "tools": [{"type": "function", "function": {"name": "echo", "parameters": ECHO["parameters"]}},
                  {"type": "custom", "custom": {"name": "grammar_tool"}}]})
    assert chat.status_code == 200 and chat.headers["LLM-Omitted-Tools"] == "custom"
    anthropic = requests.post(api_server.base + "/v1/messages", timeout=120, json={
        "model": "smollm2", "max_tokens": 8, "messages": [{"role": "user", "content": QUESTION}],
        "tools": [{"name": "echo", "input_schema": ECHO["parameters"]},
                  {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
                  {"type": "bash_20250124", "name": "bash"}]})
    assert anthropic.status_code == 200, anthropic.text
    assert anthropic.headers["LLM-Omitted-Tools"] == "web_search_20250305, bash_20250124"
    plain = requests.post(api_server.base + "/v1/messages", timeout=120, json={
        "model": "smollm2", "max_tokens": 4, "messages": [{"role": "user", "content": QUESTION}]})
    assert "LLM-Omitted-Tools" not in plain.headers
    # a tool_choice naming a tool that was left out is the client's mistake, said plainly
    forced = _responses(api_server, {"tools": CODEX_TOOLS, "tool_choice": {"type": "function", "name": "web_search"}})
    assert forced.status_code == 400 and forced.json()["error"]["param"] == "tool_choice"


def test_reject_setting_refuses_them_in_each_envelope(default_model_dir):
    app = Flask("strict")
    LLM(app, LLM_MODEL_PATH=default_model_dir, LLM_MODEL_ID="m", LLM_UNSUPPORTED_TOOLS="reject")
    client = app.test_client()
    refused = client.post("/v1/responses", json={"model": "m", "input": QUESTION, "tools": CODEX_TOOLS})
    assert refused.status_code == 400 and refused.json["error"]["param"] == "tools"
    assert "web_search, image_generation" in refused.json["error"]["message"]
    anthropic = client.post("/v1/messages", json={"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}],
                                                  "tools": [{"type": "web_search_20250305", "name": "web_search"}]})
    assert anthropic.status_code == 400 and anthropic.json["error"]["type"] == "invalid_request_error"
    assert "web_search_20250305" in anthropic.json["error"]["message"]
    served = client.post("/v1/responses", json={"model": "m", "input": QUESTION, "max_output_tokens": 4,
                                                "tools": [SHELL]})
    assert served.status_code == 200  # function tools alone are served as ever
