"""How a chat with tools becomes a prompt: the model's own template when it takes tools, else the default tool prompt."""

from __future__ import annotations

import pytest

from llm_blueprint.chat.conversation import ChatRequest, Message, ResponseFormat, Tool, ToolCallRecord, ToolChoice
from llm_blueprint.chat.prompt import DEFAULT_TOOL_PROMPT, call_opening, render
from llm_blueprint.engine import Model, ModelOptions

WEATHER = Tool("get_weather", "Current weather", {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
HISTORY = [
    Message("user", "Weather in Paris?"),
    Message("assistant", "", [ToolCallRecord("call_1", "get_weather", {"city": "Paris"})]),
    Message("tool", "18 C", tool_call_id="call_1", name="get_weather"),
    Message("tool", "service slow", tool_call_id="call_1", name="get_weather", is_error=True),
]

# The tool parts of Qwen2.5's template (Hermes format), abridged.
QWEN_STYLE = """{%- if tools %}<|im_start|>system
# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Return <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for tool_call in message.tool_calls %}
<tool_call>
{"name": "{{ tool_call.function.name }}", "arguments": {{ tool_call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# Llama 3.1 style: tools as JSON in the user turn, calls as bare {"name", "parameters"} objects.
LLAMA_STYLE = """{%- for message in messages %}<|im_start|>{{ message.role }}
{%- if tools and loop.last %} Functions: {% for t in tools %}{{ t | tojson }}{% endfor %}
Respond with {"name": function name, "parameters": dictionary of argument name and its value}.{% endif %}
{{ message.content }}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

THINKING = """{% for message in messages %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
<think>
{% endif %}"""


@pytest.fixture(scope="module")
def models(default_model_dir):
    loaded = {name: Model(default_model_dir, ModelOptions(device="cpu", chat_template=template))
              for name, template in {"default": None, "qwen": QWEN_STYLE, "llama": LLAMA_STYLE, "thinking": THINKING}.items()}
    yield loaded
    for model in loaded.values():
        model.close()


def test_default_template_gets_the_default_tool_prompt(models):
    model = models["default"]
    assert not model.chat_template.supports_tools
    prompt = render(model, ChatRequest(list(HISTORY), [WEATHER]))
    assert DEFAULT_TOOL_PROMPT.split("\n")[0] in prompt.text
    assert '"name": "get_weather", "description": "Current weather"' in prompt.text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt.text
    # Both results in one user turn, in plain words; the failed one says so.
    assert ("<|im_start|>user\nThe get_weather tool returned: 18 C\nThe get_weather tool failed with: service slow<|im_end|>"
            in prompt.text)
    assert prompt.call_format == "hermes" and prompt.ids == model.encode_text(prompt.text)
    assert call_opening(prompt, "get_weather") == '<tool_call>\n{"name": "get_weather", "arguments": '


def test_tool_choice_none_hides_the_tools_but_keeps_the_history(models):
    prompt = render(models["default"], ChatRequest(list(HISTORY), [WEATHER], ToolChoice("none")))
    assert "<tools>" not in prompt.text and "The get_weather tool returned: 18 C" in prompt.text


def test_a_template_that_takes_tools_renders_them_itself(models):
    model = models["qwen"]
    assert model.chat_template.supports_tools
    prompt = render(model, ChatRequest(list(HISTORY), [WEATHER]))
    assert "# Tools\n<tools>" in prompt.text and DEFAULT_TOOL_PROMPT.split("\n")[0] not in prompt.text
    assert '{"type": "function", "function": {"name": "get_weather"' in prompt.text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt.text
    assert "<tool_response>\n18 C\n</tool_response>" in prompt.text
    assert prompt.call_format == "hermes"


def test_llama_style_calls_are_forced_as_bare_json(models):
    prompt = render(models["llama"], ChatRequest([Message("user", "Weather in Paris?")], [WEATHER]))
    assert prompt.call_format == "json" and prompt.arguments_key == "parameters"
    assert call_opening(prompt, "get_weather") == '{"name": "get_weather", "parameters": '
    assert call_opening(prompt, None) == '{"name": "'


def test_a_template_that_opens_thinking(models):
    prompt = render(models["thinking"], ChatRequest([Message("user", "Hi")], [WEATHER]))
    assert prompt.in_reasoning
    assert call_opening(prompt, "get_weather").startswith("</think>\n\n<tool_call>")


def test_json_output_instruction_carries_the_schema(models):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    prompt = render(models["default"], ChatRequest([Message("user", "A number?")], response_format=ResponseFormat("json_schema", schema)))
    assert 'Reply with one JSON value and nothing else' in prompt.text and '"required": ["n"]' in prompt.text
