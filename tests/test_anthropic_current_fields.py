"""Anthropic's current request fields through the official SDK 2.x: output_config (format, effort), adaptive thinking,
fields a local server has no use for, and the usage fields of the SDK's Message type."""

from __future__ import annotations

import json

import anthropic
import jsonschema
import pytest
from outcomes import wait_idle

CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
               "required": ["city", "country"]}
QUESTION = [{"role": "user", "content": "Give the city and country of the capital of France."}]
FORMAT = {"format": {"type": "json_schema", "schema": CITY_SCHEMA}}


@pytest.fixture(autouse=True)
def _served_alone(api_server):
    wait_idle(api_server.base)


def test_output_config_format_returns_json_that_validates(anthropic_client):
    kwargs = dict(model="smollm2", max_tokens=100, messages=QUESTION, output_config=FORMAT, extra_body={"temperature": 0})
    whole = anthropic_client.messages.create(**kwargs)

    def streamed_call():
        with anthropic_client.messages.stream(**kwargs) as stream:
            return "".join(stream.text_stream), stream.get_final_message()

    streamed = streamed_call()
    text = whole.content[0].text
    assert streamed[0] == text == streamed[1].content[0].text
    if whole.stop_reason == "max_tokens":  # cut, as the hosted API returns it
        assert text.startswith('{"city": "')
    else:
        assert whole.stop_reason == "end_turn"
        jsonschema.validate(json.loads(text), CITY_SCHEMA)  # never prose: the schema is not ignored


def test_a_bad_output_schema_is_a_400(anthropic_client):
    with pytest.raises(anthropic.BadRequestError) as info:
        anthropic_client.messages.create(model="smollm2", max_tokens=10, messages=QUESTION,
                                         output_config={"format": {"type": "json_schema", "schema": {"type": 5}}})
    assert "output_config.format.schema" in str(info.value)
    with pytest.raises(anthropic.BadRequestError):
        anthropic_client.messages.create(model="smollm2", max_tokens=10, messages=QUESTION,
                                         output_config={"effort": "enormous"})


def test_effort_adaptive_thinking_and_fields_without_local_meaning_are_accepted(anthropic_client):
    message = anthropic_client.messages.create(
        model="smollm2", max_tokens=5, messages=[{"role": "user", "content": "Hi"}], output_config={"effort": "low"},
        thinking={"type": "adaptive"}, service_tier="standard_only", inference_geo="eu", cache_control={"type": "ephemeral"},
        metadata={"user_id": "u1"}, extra_body={"diagnostics": {"cache_miss_reason": True}, "some_future_field": 1})
    assert message.type == "message" and message.usage.output_tokens >= 1
    usage = message.usage
    assert usage.cache_read_input_tokens == 0 and usage.cache_creation_input_tokens == 0
    assert usage.cache_creation.ephemeral_5m_input_tokens == 0 and usage.service_tier == "standard"
    with anthropic_client.messages.stream(model="smollm2", max_tokens=3, messages=[{"role": "user", "content": "Hi"}]) as stream:
        final = stream.get_final_message()
    assert final.usage.input_tokens == message.usage.input_tokens and final.usage.cache_read_input_tokens == 0


def test_cache_control_breakpoints_on_blocks_are_accepted(anthropic_client):
    system = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}}]}]
    marked = anthropic_client.messages.count_tokens(model="smollm2", system=system, messages=messages)
    plain = anthropic_client.messages.count_tokens(model="smollm2", system="Be brief.", messages=[{"role": "user", "content": "Hi"}])
    assert marked.input_tokens == plain.input_tokens
    assert anthropic_client.messages.create(model="smollm2", max_tokens=2, system=system, messages=messages).usage.input_tokens \
        == plain.input_tokens
