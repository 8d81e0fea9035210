"""Real structured-output clients against gunicorn -k gevent and the default model: instructor (TOOLS, JSON_SCHEMA,
ANTHROPIC_TOOLS, no retries) and LangChain's with_structured_output / bind_tools on ChatOpenAI and ChatAnthropic.

Each returns its pydantic object or tool call on the first try: the server constrains the output to the schema the
client sends, so no client-side retry or repair is ever needed.
"""

from __future__ import annotations

from typing import Literal

import instructor  # the test extra installs these: a missing one fails, never skips
import langchain_anthropic
import langchain_openai
import pytest
from outcomes import wait_idle
from pydantic import BaseModel, Field

QUESTION = "Describe the capital of France."


class Address(BaseModel):
    city: str = Field(max_length=30)
    country: str = Field(max_length=30)


class Capital(BaseModel):
    """The capital of a country."""

    name: str = Field(max_length=30)
    population_millions: float = Field(ge=0, le=50)
    address: Address
    landmarks: list[str] = Field(min_length=1, max_length=3)
    size: Literal["small", "medium", "large"]


class GetWeather(BaseModel):
    """Get the current weather for a city."""

    city: str = Field(max_length=30)
    unit: Literal["celsius", "fahrenheit"]


@pytest.fixture(autouse=True)
def _served_alone(api_server):
    wait_idle(api_server.base)


def _check(capital: Capital) -> None:
    assert isinstance(capital, Capital) and isinstance(capital.address, Address)
    assert 1 <= len(capital.landmarks) <= 3 and capital.size in ("small", "medium", "large")


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor_openai(openai_client, mode):
    client = instructor.from_openai(openai_client, mode=getattr(instructor.Mode, mode))
    for temperature in (0.0, 1.0):
        capital = client.chat.completions.create(model="smollm2", response_model=Capital, max_retries=0, max_tokens=200,
                                                 temperature=temperature, messages=[{"role": "user", "content": QUESTION}])
        _check(capital)


def test_instructor_anthropic_tools(anthropic_client):
    client = instructor.from_anthropic(anthropic_client, mode=instructor.Mode.ANTHROPIC_TOOLS)
    for temperature in (0.0, 1.0):
        capital = client.messages.create(model="smollm2", response_model=Capital, max_retries=0, max_tokens=200,
                                         extra_body={"temperature": temperature},  # SDK 2.x: no temperature argument
                                         messages=[{"role": "user", "content": QUESTION}])
        _check(capital)


def _chat_models(api_server):
    openai_model = langchain_openai.ChatOpenAI(base_url=api_server.base + "/v1", api_key="unused", model="smollm2",
                                               max_tokens=200, temperature=0, max_retries=0, timeout=120)
    anthropic_model = langchain_anthropic.ChatAnthropic(base_url=api_server.base, api_key="sk-ant-test", model="smollm2",
                                                        max_tokens=200, temperature=0, max_retries=0, timeout=120)
    return {"openai": openai_model, "anthropic": anthropic_model}


@pytest.mark.parametrize("provider, method", [("openai", "json_schema"), ("openai", "function_calling"),
                                              ("openai", "json_mode"), ("anthropic", "function_calling")])
def test_langchain_with_structured_output(api_server, provider, method):
    model = _chat_models(api_server)[provider]
    if method == "json_mode":  # the schema only reaches the model through the prompt; the server guarantees a JSON object
        result = model.with_structured_output(Capital, method=method, include_raw=True).invoke(
            f"{QUESTION} Reply as JSON with the keys name, population_millions, address (city, country), "
            "landmarks (a list) and size (small, medium or large).")
        assert isinstance(result["raw"].content, str) and result["raw"].content.lstrip().startswith("{")
        return
    _check(model.with_structured_output(Capital, method=method).invoke(QUESTION))


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_langchain_bind_tools(api_server, provider):
    model = _chat_models(api_server)[provider]
    message = model.bind_tools([GetWeather], tool_choice="GetWeather").invoke("What's the weather in Paris?")
    (call,) = message.tool_calls
    assert call["name"] == "GetWeather"
    GetWeather.model_validate(call["args"])
    message = model.bind_tools([GetWeather, Capital], tool_choice="any").invoke("What's the weather in Paris?")
    assert message.tool_calls and message.tool_calls[0]["name"] in ("GetWeather", "Capital")
