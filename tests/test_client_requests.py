"""Real client requests, replayed (issue #36): the bodies the OpenAI Agents SDK 0.24, the Vercel AI SDK 6 and Codex
CLI 0.171 sent (captured once from the real programs: tests/data/*/README.md), posted as they were through gunicorn,
and every answer checked against what those clients parse: each body and stream event validates as the official
SDKs' own types; events come in the order the clients rely on (``response.created`` first and a terminal event last,
which Codex needs; ``message_start`` first and ``message_stop`` last; ``[DONE]`` last); a tool choice that requires a
call gets one; a JSON schema format gets matching JSON. Claude Code's bodies: tests/test_agent_requests.py.
"""

from __future__ import annotations

import glob
import json
import os

import anthropic.types as anthropic_types
import jsonschema
import openai.types.chat as chat_types
import openai.types.responses as responses_types
import pytest
import requests
from chat_templates import GEMMA_TEMPLATE
from pydantic import TypeAdapter
from servers import gunicorn

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SDK_CAPTURES = sorted(glob.glob(os.path.join(DATA, "openai-agents-0.24.0", "*.json"))
                      + glob.glob(os.path.join(DATA, "ai-sdk-6.0.333", "*.json")))

RESPONSE_EVENT = TypeAdapter(responses_types.ResponseStreamEvent)
ANTHROPIC_EVENT = TypeAdapter(anthropic_types.RawMessageStreamEvent)


def _load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _events(response: requests.Response) -> list[tuple[str | None, str]]:
    """(event name, data) of an SSE body, comments skipped."""
    out, name, data = [], None, []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith(":"):
            continue
        if not line:
            if data:
                out.append((name, "\n".join(data)))
            name, data = None, []
        elif line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
    return out


def _schema(body: dict) -> dict | None:
    """The JSON schema a body asks its answer to match (chat response_format, Responses text.format)."""
    fmt = body.get("response_format") or (body.get("text") or {}).get("format") or {}
    if fmt.get("type") != "json_schema":
        return None
    return (fmt.get("json_schema") or {}).get("schema") or fmt.get("schema")


def _forced(body: dict) -> bool:
    choice = body.get("tool_choice")
    return choice == "required" or (isinstance(choice, dict) and choice.get("type") in ("any", "tool", "function"))


def check_chat(body: dict, response: requests.Response) -> None:
    if body.get("stream"):
        events = _events(response)
        assert events[-1][1] == "[DONE]"
        chunks = [chat_types.ChatCompletionChunk.model_validate_json(data) for _, data in events[:-1]]
        assert any(c.choices and c.choices[0].finish_reason for c in chunks)
        if (body.get("stream_options") or {}).get("include_usage"):
            assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0
        return
    completion = chat_types.ChatCompletion.model_validate(response.json())
    message = completion.choices[0].message
    if _forced(body):
        assert message.tool_calls and completion.choices[0].finish_reason == "tool_calls"
        for call in message.tool_calls:
            json.loads(call.function.arguments)
    if (schema := _schema(body)) is not None:
        jsonschema.validate(json.loads(message.content), schema)


def check_responses(body: dict, response: requests.Response) -> responses_types.Response:
    if body.get("stream"):
        events = [RESPONSE_EVENT.validate_json(data) for _, data in _events(response)]
        assert events[0].type == "response.created"
        assert events[-1].type in ("response.completed", "response.incomplete")  # a stream never just stops
        assert [e.sequence_number for e in events] == sorted({e.sequence_number for e in events})
        added = [e.output_index for e in events if e.type == "response.output_item.added"]
        assert added == [e.output_index for e in events if e.type == "response.output_item.done"]
        final = events[-1].response
    else:
        final = responses_types.Response.model_validate(response.json())
    assert final.usage.input_tokens > 0 and final.status in ("completed", "incomplete")
    if final.status == "incomplete":  # cut by max_output_tokens (the server's default when the body gives none)
        assert final.incomplete_details.reason == "max_output_tokens"
    if _forced(body):
        calls = [item for item in final.output if item.type == "function_call"]
        assert calls and all(isinstance(json.loads(c.arguments), dict) for c in calls)
    if (schema := _schema(body)) is not None:
        jsonschema.validate(json.loads(final.output_text), schema)
    return final


def check_messages(body: dict, response: requests.Response) -> None:
    if body.get("stream"):
        raw = [(name, json.loads(data)) for name, data in _events(response)]
        # ping (a keep-alive while the model is busy) is outside the SDK's event union: its stream skips it
        assert all(data == {"type": "ping"} for name, data in raw if name == "ping")
        events = [ANTHROPIC_EVENT.validate_python(data) for name, data in raw if name != "ping"]
        assert raw[0][0] == "message_start" and events[0].type == "message_start" and events[-1].type == "message_stop"
        opened = [e.index for e in events if e.type == "content_block_start"]
        assert opened == [e.index for e in events if e.type == "content_block_stop"] == list(range(len(opened)))
        return
    message = anthropic_types.Message.model_validate(response.json())
    if _forced(body):
        uses = [block for block in message.content if block.type == "tool_use"]
        assert uses and message.stop_reason == "tool_use" and all(isinstance(u.input, dict) for u in uses)
        if (body.get("tool_choice") or {}).get("disable_parallel_tool_use"):
            assert len(uses) == 1
        for use in uses:  # the input matches the tool's schema (the AI SDK's generateObject reads its json tool so)
            tool = next(t for t in body["tools"] if t["name"] == use.name)
            jsonschema.validate(use.input, tool["input_schema"])


CHECKS = {"/v1/chat/completions": check_chat, "/v1/responses": check_responses, "/v1/messages": check_messages}


@pytest.mark.parametrize("capture", SDK_CAPTURES, ids=lambda p: "/".join(p.split(os.sep)[-2:]))
def test_sdk_agent_requests_get_answers_their_sdks_parse(api_server, capture):
    recorded = _load(capture)
    body = {**recorded["body"], "model": "smollm2"}
    response = requests.post(api_server.base + recorded["path"], json=body, timeout=300, stream=bool(body.get("stream")),
                             headers={k: v for k, v in recorded["headers"].items() if k.lower() != "content-type"})
    assert response.status_code == 200, response.text
    CHECKS[recorded["path"]](body, response)


@pytest.fixture(scope="module")
def gemma_long_context(gemma3_int8_dir, tmp_path_factory):
    """Gemma 3 270M with its 32k context (Codex's requests are about 9,000 tokens: more than SmolLM2's 8,192)."""
    template = tmp_path_factory.mktemp("template") / "gemma.jinja"
    template.write_text(GEMMA_TEMPLATE)
    env = {"LLM_MODEL_PATH": gemma3_int8_dir, "LLM_MODEL_ID": "gemma", "LLM_CHAT_TEMPLATE": str(template),
           "LLM_ACCEPT_ANY_MODEL": "1", "LLM_CONTEXT_LENGTH": "32768", "LLM_EAGER_LOAD": "1", "LLM_DEFAULT_EMBEDDINGS": "0",
           "LLM_DEFAULT_MAX_TOKENS": "16"}  # Codex gives no max_output_tokens: the answers stay short
    with gunicorn("wsgi:app", env, str(tmp_path_factory.mktemp("logs") / "gemma.log"), "/readyz", timeout=300) as server:
        yield server


def test_codex_turns_stream_to_response_completed(gemma_long_context):
    """Codex's two turns as it sent them (its default tools: a namespace tool and the hosted web_search among them),
    streamed to their terminal event (Codex fails a turn whose stream just ends, ollama#14600); the answers are cut
    at 16 tokens by the server's default budget, so that terminal event is response.incomplete here."""
    for turn in (1, 2):
        recorded = _load(os.path.join(DATA, "codex-0.171.0", f"turn{turn}.json"))
        response = requests.post(gemma_long_context.base + recorded["path"], json=recorded["body"],
                                 headers=recorded["headers"], stream=True, timeout=600)
        assert response.status_code == 200, response.text
        assert "web_search" in response.headers.get("LLM-Omitted-Tools", "")
        final = check_responses(recorded["body"], response)
        assert final.usage.input_tokens > 8000
