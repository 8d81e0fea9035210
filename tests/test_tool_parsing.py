"""The output parser over recorded model outputs of each format, fed whole and split into many stream deltas."""

from __future__ import annotations

import json
import random

import pytest

from llm_blueprint.chat.conversation import Tool
from llm_blueprint.chat.output_parser import OutputParser
from llm_blueprint.chat.prompt import json_opening
from llm_blueprint.events import ReasoningDelta, TextDelta, ToolCall

WEATHER = Tool("get_weather", "Current weather", {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
TIME = Tool("get_time", "Current time", {"type": "object", "properties": {"timezone": {"type": "string"}, "utc": {"type": "boolean"}}})
TOOLS = [WEATHER, TIME]

# Outputs recorded from models (Qwen2.5 / Hermes 3 / Llama 3.1 / Gemma 3 / DeepSeek-R1 styles), verbatim.
RECORDED = {
    "hermes_one": (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        [], [("get_weather", {"city": "Paris"})]),
    "hermes_text_then_two_calls": (
        'Let me check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris", "utc": false}}\n</tool_call>',
        ["Let me check both."], [("get_weather", {"city": "Paris"}), ("get_time", {"timezone": "Europe/Paris", "utc": False})]),
    "hermes_arguments_as_string": (
        '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Lyon\\"}"}</tool_call>',
        [], [("get_weather", {"city": "Lyon"})]),
    "hermes_unclosed_at_end": (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}',
        [], [("get_weather", {"city": "Oslo"})]),
    "llama_bare_json": (
        '{"name": "get_weather", "parameters": {"city": "Rome"}}',
        [], [("get_weather", {"city": "Rome"})]),
    "bare_json_list": (
        '[{"name": "get_weather", "arguments": {"city": "Rome"}}, {"name": "get_time", "arguments": {"timezone": "UTC"}}]',
        [], [("get_weather", {"city": "Rome"}), ("get_time", {"timezone": "UTC"})]),
    "gemma_tool_code_keywords": (
        'I will look it up.\n```tool_code\nget_weather(city="Berlin")\n```',
        ["I will look it up."], [("get_weather", {"city": "Berlin"})]),
    "gemma_tool_code_single_positional": (
        '```tool_code\nget_weather("Madrid")\n```',
        [], [("get_weather", {"city": "Madrid"})]),
    "plain_text_with_braces": (
        'Use {"a": 1} in your config; <b>bold</b> is HTML.',
        ['Use {"a": 1} in your config; <b>bold</b> is HTML.'], []),
    "json_answer_that_is_not_a_call": (
        '{"answer": 42}',
        ['{"answer": 42}'], []),
    "unknown_tool_stays_text": (
        '<tool_call>\n{"name": "launch_rocket", "arguments": {}}\n</tool_call>',
        ['<tool_call>\n{"name": "launch_rocket", "arguments": {}}\n</tool_call>'], []),
    "broken_json_stays_text": (
        'Sure <tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',
        ['Sure <tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'], []),
    "arguments_not_an_object_stays_text": (
        '<tool_call>{"name": "get_weather", "arguments": ["Paris"]}</tool_call>',
        ['<tool_call>{"name": "get_weather", "arguments": ["Paris"]}</tool_call>'], []),
}


def splits(text: str, how: str) -> list[str]:
    if how == "whole":
        return [text]
    if how == "chars":
        return list(text)
    rng = random.Random(sum(map(ord, text)))
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 12)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def run(deltas: list[str], tools=TOOLS, **options) -> tuple[list[str], list[str], list[tuple[str, dict]]]:
    parser = OutputParser(tools, **options)
    pieces = [p for d in deltas for p in parser.feed(d)] + parser.finish()
    texts = [p.text for p in pieces if isinstance(p, TextDelta)]
    reasoning = [p.text for p in pieces if isinstance(p, ReasoningDelta)]
    calls = [(p.name, json.loads(p.arguments)) for p in pieces if isinstance(p, ToolCall)]
    return texts, reasoning, calls


@pytest.mark.parametrize("how", ["whole", "chars", "random"])
@pytest.mark.parametrize("name", sorted(RECORDED))
def test_recorded_outputs(name, how):
    output, want_text, want_calls = RECORDED[name]
    texts, reasoning, calls = run(splits(output, how))
    assert calls == want_calls
    assert "".join(texts) == "".join(want_text)
    assert reasoning == []


@pytest.mark.parametrize("how", ["whole", "chars", "random"])
def test_no_markup_leaks_into_streamed_text(how):
    output = RECORDED["hermes_text_then_two_calls"][0]
    texts, _, _ = run(splits(output, how))
    for marker in ("<tool_call>", "</tool_call>", "<tool", "{\"name\""):
        assert marker not in "".join(texts)
    assert all(t.strip() for t in texts)  # no whitespace-only deltas between calls


def test_text_before_a_call_streams_before_the_call_is_complete():
    parser = OutputParser(TOOLS)
    first = parser.feed("The weather: <tool_ca")
    assert first == [TextDelta(0, "The weather:")]  # the partial marker is held, the text before it is not
    assert parser.feed('ll>{"name": "get_weather", "arguments": {"city"') == []
    assert parser.feed(': "Paris"}}</tool_call>')[0].name == "get_weather"


def test_without_tools_calls_are_plain_text():
    output = RECORDED["hermes_one"][0]
    texts, _, calls = run(splits(output, "chars"), tools=[])
    assert calls == [] and "".join(texts) == output


DEEPSEEK = "<think>\nThe user greets me. I should greet back.\n</think>\n\nHello! How can I help?"


@pytest.mark.parametrize("how", ["whole", "chars", "random"])
def test_reasoning_split_from_answer(how):
    texts, reasoning, _ = run(splits(DEEPSEEK, how))
    assert "".join(reasoning) == "\nThe user greets me. I should greet back.\n"
    assert "".join(texts) == "Hello! How can I help?"


@pytest.mark.parametrize("how", ["whole", "chars", "random"])
def test_reasoning_opened_by_the_template(how):
    # Qwen3 / R1 templates end the prompt with "<think>\n": the output starts inside the block.
    output = "The capital of France is Paris.\n</think>\nThe answer is Paris."
    texts, reasoning, _ = run(splits(output, how), in_reasoning=True)
    assert "".join(reasoning) == "The capital of France is Paris.\n"
    assert "".join(texts) == "The answer is Paris."


def test_reasoning_then_tool_call():
    output = '<think>I need the weather tool.</think>\n<tool_call>{"name": "get_weather", "arguments": {"city": "Nice"}}</tool_call>'
    texts, reasoning, calls = run(splits(output, "chars"))
    assert reasoning and "".join(reasoning) == "I need the weather tool."
    assert calls == [("get_weather", {"city": "Nice"})] and texts == []


def test_reasoning_off_leaves_the_markup_in_the_text():
    texts, reasoning, _ = run([DEEPSEEK], reasoning=False)
    assert reasoning == [] and "".join(texts) == DEEPSEEK


def test_think_later_in_the_answer_is_text():
    texts, reasoning, _ = run(["Use the <think> tag for reasoning."])
    assert reasoning == [] and "".join(texts) == "Use the <think> tag for reasoning."


def test_unfinished_reasoning_is_all_reasoning():
    texts, reasoning, _ = run(splits("<think>still thinking when max_tokens hit", "chars"))
    assert "".join(reasoning) == "still thinking when max_tokens hit" and texts == []


def test_json_opening_nudges_the_first_required_property():
    assert json_opening(WEATHER.parameters) == '{"city": "'
    assert json_opening(TIME.parameters) == "{"
    assert json_opening({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}) == '{"n": '
    assert json_opening({"type": "array"}) == "["
    assert json_opening(None) == "{"


class RecordedStream:
    """Engine events recorded from a run, replayed; remembers whether the pipeline asked it to stop."""

    def __init__(self, events):
        self.events, self.cancelled = iter(events), False

    def __iter__(self):
        return self.events

    def cancel(self):
        self.cancelled = True


def _free_run(text_deltas: list[str], parallel: bool):
    from llm_blueprint.chat.conversation import ChatRequest, ToolChoice
    from llm_blueprint.chat.pipeline import ChatStream
    from llm_blueprint.chat.prompt import ChatPrompt
    from llm_blueprint.events import Done, Finish, GenerationRequest

    chat = ChatRequest([], TOOLS, ToolChoice("auto", parallel=parallel))
    stream = ChatStream.__new__(ChatStream)  # the pipeline's free mode alone, over recorded engine events
    stream.chat, stream.reasoning = chat, True
    stream.request = GenerationRequest([1], 50)
    stream.prompt = ChatPrompt("", [1], False, "hermes", "arguments")
    stream._unsent_logprobs = {}
    recorded = RecordedStream([TextDelta(0, d) for d in text_deltas] + [Finish(0, "cancelled" if not parallel else "stop", 30),
                                                                         Done(1, 30)])
    events = list(stream._free(recorded))
    return [e for e in events if isinstance(e, ToolCall)], [e for e in events if isinstance(e, Finish)], recorded


def test_parallel_tool_calls_false_keeps_one_call_and_stops_generating():
    output = RECORDED["hermes_text_then_two_calls"][0]
    calls, finishes, recorded = _free_run(splits(output, "random"), parallel=False)
    assert [c.name for c in calls] == ["get_weather"] and recorded.cancelled
    assert finishes[0].reason == "tool_calls"
    calls, finishes, recorded = _free_run(splits(output, "random"), parallel=True)
    assert [c.name for c in calls] == ["get_weather", "get_time"] and not recorded.cancelled
    assert [c.call_index for c in calls] == [0, 1] and len({c.id for c in calls}) == 2
    assert finishes[0].reason == "tool_calls"
