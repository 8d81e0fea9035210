"""Real agent requests, replayed: Claude Code 2.1.197's two turns (tests/data/claude-code-2.1.197), as it sends
them, against what the server must make of them (issues #35 and #36)."""

from __future__ import annotations

import json
import os

import pytest
import requests
from chat_templates import GEMMA_TEMPLATE

from llm_blueprint.api.anthropic import MESSAGES_SCHEMA, _chat_request
from llm_blueprint.chat.prompt import render
from llm_blueprint.engine import Model, ModelOptions
from llm_blueprint.engine.prompt_cache import PromptCache

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "claude-code-2.1.197")


def _body(turn: int) -> dict:
    with open(os.path.join(DATA, f"turn{turn}.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def gemma(gemma3_int8_dir, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "gemma.jinja"
    template.write_text(GEMMA_TEMPLATE)
    model = Model(gemma3_int8_dir, ModelOptions(device="cpu", compute_type="int8", intra_threads=1,
                                                 context_length=32768, chat_template=str(template)))
    yield model
    model.close()


def test_the_second_turn_reads_what_the_first_stored(gemma):
    """The first turn stores the prefix up to its last cache_control mark (system, tools, the first message:
    over 19,000 tokens); the second turn's prompt starts with exactly those tokens, so it reads them instead of
    prefilling them again. Needs the billing-header line dropped and the system entry folded the same way in both."""
    cache = PromptCache(bytes_per_token=36 * 1024, budget_bytes=4 * 2**30)
    prompts = [render(gemma, _chat_request(MESSAGES_SCHEMA.load(_body(turn))), cache_points=True) for turn in (1, 2)]
    first, second = prompts
    assert len(first.ids) > 19000 and first.cache_marks and max(first.cache_marks) > 0.95 * len(first.ids)
    stored = cache.plan(first.ids, first.cache_points, first.cache_marks)
    assert stored.store and stored.length == max(first.cache_marks)
    cache.ready(stored)
    assert second.ids[:stored.length] == first.ids[:stored.length]
    read = cache.plan(second.ids, second.cache_points, second.cache_marks)
    assert not read.store and read.length == stored.length
    assert len(second.ids) - read.length < 100  # the answer "hi" and "now say bye", with their turns' markers


def test_the_requests_are_taken_and_a_context_too_small_is_said_in_anthropics_words(api_server):
    """On the 8,192-token default model: count_tokens answers, and the turn gets Anthropic's "prompt is too long"
    (400, invalid_request_error), which Claude Code shows as such, not a validation error of its fields."""
    for turn in (1, 2):
        body = {**_body(turn), "model": "smollm2"}  # ANTHROPIC_MODEL names the served model
        counted = requests.post(api_server.base + "/v1/messages/count_tokens", timeout=60,
                                json={k: body[k] for k in ("model", "messages", "system", "tools", "thinking")})
        assert counted.status_code == 200, counted.text
        tokens = counted.json()["input_tokens"]
        assert tokens > 8192
        reply = requests.post(api_server.base + "/v1/messages?beta=true", json=body, timeout=60)
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["message"] == f"prompt is too long: {tokens} tokens > 8192 maximum"
