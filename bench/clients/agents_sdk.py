"""OpenAI Agents SDK against a local server: Responses and Chat Completions models, a function tool, a streamed run,
an output_type."""
import asyncio
import sys

from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
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

async def main():
    results = {}
    for label, model in (("responses", OpenAIResponsesModel("smollm2", client)), ("chat", OpenAIChatCompletionsModel("smollm2", client))):
        settings = ModelSettings(max_tokens=48)
        forced = ModelSettings(max_tokens=48, tool_choice="required")
        agent = Agent(name="helper", instructions="You are helpful. Use tools when useful.", tools=[get_weather], model=model, model_settings=forced, reset_tool_choice=True)
        r = await Runner.run(agent, "What is the weather in Paris?", max_turns=3)
        results[label + " tool"] = str(r.final_output)[:60]
        plain = Agent(name="plain", instructions="You are helpful.", tools=[get_weather], model=model, model_settings=settings)
        streamed = Runner.run_streamed(plain, "Say hello.", max_turns=2)
        async for _ in streamed.stream_events():
            pass
        results[label + " stream"] = str(streamed.final_output)[:60]
        typed = Agent(name="typed", instructions="Answer with a colour.", output_type=Colour, model=model, model_settings=settings)
        r = await Runner.run(typed, "Name a colour.", max_turns=1)
        results[label + " output_type"] = repr(r.final_output)[:60]
    for k, v in results.items():
        print(k, "->", v)

asyncio.run(main())
