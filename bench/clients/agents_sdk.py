"""OpenAI Agents SDK against this server: Responses and Chat Completions models, a function tool (a call forced,
then its output sent back), a streamed run, an output_type. ``python bench/clients/agents_sdk.py BASE_URL``
(needs ``openai-agents``; bench/agent_clients.py --client agents installs it in a venv of its own)."""

import asyncio
import sys

from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI
from pydantic import BaseModel

base = sys.argv[1]
set_tracing_disabled(True)
client = AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"It is sunny in {city}."


class Colour(BaseModel):
    name: str


async def main() -> int:
    results = {}
    models = (("responses", OpenAIResponsesModel("smollm2", client)), ("chat", OpenAIChatCompletionsModel("smollm2", client)))
    for label, model in models:
        settings = ModelSettings(max_tokens=256, temperature=0)
        forced = ModelSettings(max_tokens=256, temperature=0, tool_choice="required")
        # A forced call, its output run back into the model: the first run stops at the tool's result (a small model
        # would call the tool forever), the second goes on from the first's items (function_call and its output).
        agent = Agent(name="helper", instructions="You are helpful. Use tools when useful.", tools=[get_weather],
                      model=model, model_settings=forced, tool_use_behavior="stop_on_first_tool")
        called = await Runner.run(agent, "What is the weather in Paris?", max_turns=2)
        answer = Agent(name="answer", instructions="You are helpful.", model=model, model_settings=settings)
        follow = called.to_input_list() + [{"role": "user", "content": "So, what is it like there?"}]
        run = await Runner.run(answer, follow, max_turns=1)
        results[label + " tool"] = f"{called.final_output!r} then {str(run.final_output)[:40]!r}"
        plain = Agent(name="plain", instructions="You are helpful.", tools=[get_weather], model=model, model_settings=settings)
        streamed = Runner.run_streamed(plain, "Say hello.", max_turns=2)
        async for _ in streamed.stream_events():
            pass
        results[label + " stream"] = str(streamed.final_output)[:60]
        typed = Agent(name="typed", instructions="Answer with a colour.", output_type=Colour, model=model,
                      model_settings=settings)
        run = await Runner.run(typed, "Name a colour.", max_turns=1)
        results[label + " output_type"] = repr(run.final_output)[:60]
    for key, value in results.items():
        print(key, "->", value)
    return 0 if len(results) == 6 else 1


sys.exit(asyncio.run(main()))
