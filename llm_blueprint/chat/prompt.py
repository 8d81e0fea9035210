"""From a :class:`ChatRequest` to prompt text: the model's chat template, with tools.

A template that takes ``tools`` (Hugging Face's convention: it references the
``tools`` variable) renders the tools, assistant ``tool_calls`` and ``tool``
messages itself. Any other template gets the default tool prompt below in its
system message, earlier calls written into the assistant turns as
``<tool_call>`` blocks (the Hermes format, which many small models were
trained on), and tool results as a user turn in plain words ("The get_weather
tool returned: …"), which models without tool training answer best (measured
with SmolLM2-135M: ``<tool_response>`` markup made it echo the markup).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from ..engine.model import Model
from .conversation import ChatRequest, Message, Tool
from .output_parser import CALL_OPEN, THINK_CLOSE, THINK_OPEN

DEFAULT_TOOL_PROMPT = """You may call functions to help with the user's request. The functions are described as JSON within <tools></tools>:
<tools>
{tools}
</tools>
To call a function, reply with a JSON object giving its name and arguments within <tool_call></tool_call> tags:
<tool_call>
{{"name": <function name>, "arguments": <arguments as a JSON object>}}
</tool_call>"""

JSON_PROMPT = "Reply with one JSON value and nothing else: no prose, no code fence."
JSON_SCHEMA_PROMPT = JSON_PROMPT + " It must validate against this JSON Schema:\n{schema}"


@dataclass
class ChatPrompt:
    text: str  # the rendered prompt, ending with the assistant turn's opening
    ids: list[int]
    in_reasoning: bool  # the template opened a <think> block for the answer
    call_format: str  # how a forced call is opened: "hermes" (<tool_call>) or "json" (bare object)
    arguments_key: str  # "arguments", or "parameters" for Llama-3-style templates
    cache_points: tuple[int, ...] = ()  # token counts of message-boundary prefixes worth caching (automatic)
    cache_marks: tuple[int, ...] = ()  # the same for the client's own cache points


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _hermes_history(messages: list[Message]) -> list[dict[str, Any]]:
    """History for a template without tool support: calls and results written as Hermes markup."""
    rendered: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "assistant" and message.tool_calls:
            calls = "\n".join(f"{CALL_OPEN}\n{_dumps({'name': c.name, 'arguments': c.arguments})}\n</tool_call>"
                              for c in message.tool_calls)
            content = f"{message.content}\n{calls}" if message.content else calls
            rendered.append({"role": "assistant", "content": content})
        elif message.role == "tool":
            # Plain words work better than <tool_response> markup for models never trained on tools.
            outcome = "failed with" if message.is_error else "returned"
            line = f"The {message.name} tool {outcome}: {message.content}"
            if rendered and rendered[-1].get("tool_results"):  # consecutive results share one user turn
                rendered[-1]["content"] += "\n" + line
            else:
                rendered.append({"role": "user", "content": line, "tool_results": True})
        else:
            rendered.append({"role": message.role, "content": message.content})
    for entry in rendered:
        entry.pop("tool_results", None)
    return rendered


def _native_history(messages: list[Message]) -> list[dict[str, Any]]:
    """History in Hugging Face's shape, for templates that render tool turns themselves."""
    rendered: list[dict[str, Any]] = []
    for message in messages:
        entry: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.tool_calls:
            entry["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                   for c in message.tool_calls]
        if message.role == "tool":
            entry["tool_call_id"] = message.tool_call_id
            entry["name"] = message.name
        rendered.append(entry)
    return rendered


def _with_system(messages: list[dict[str, Any]], addition: str) -> list[dict[str, Any]]:
    if not addition:
        return messages
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{addition}"}] + messages[1:]
    return [{"role": "system", "content": addition}] + messages


def _json_instruction(chat: ChatRequest) -> str:
    fmt = chat.response_format
    if fmt is None:
        return ""
    if fmt.schema is not None:
        return JSON_SCHEMA_PROMPT.format(schema=_dumps(fmt.schema))
    return JSON_PROMPT


def _render_text(model: Model, chat: ChatRequest, messages: list[Message], add_generation_prompt: bool = True) -> str:
    """``messages`` (the request's, or a prefix or continuation of them) rendered with the request's tools and
    output format."""
    template = model.chat_template
    native = template is not None and template.supports_tools
    tools: list[Tool] = chat.active_tools
    history = _native_history(messages) if native else _hermes_history(messages)
    addition = [_json_instruction(chat)]
    if tools and not native:
        addition.insert(0, DEFAULT_TOOL_PROMPT.format(tools="\n".join(_dumps(t.openai_shape()) for t in tools)))
    history = _with_system(history, "\n\n".join(a for a in addition if a))
    tool_shapes = [t.openai_shape() for t in tools] if native and tools else None
    return model.render_chat(history, tools=tool_shapes, add_generation_prompt=add_generation_prompt,
                             **chat.template_options)


def render(model: Model, chat: ChatRequest, cache_points: bool = False) -> ChatPrompt:
    """The prompt for ``chat`` (tools, history, output format), tokenized; with ``cache_points``, also the
    message-boundary prefixes the prompt cache may keep (see :func:`shared_prefix`)."""
    template = model.chat_template
    native = template is not None and template.supports_tools
    text = _render_text(model, chat, chat.messages)
    ids = model.encode_text(text, "messages")
    source = template.source if template is not None else ""
    call_format = "json" if native and CALL_OPEN not in source else "hermes"
    arguments_key = "parameters" if call_format == "json" and '"parameters"' in source else "arguments"
    prompt = ChatPrompt(text, ids, text.rstrip().endswith(THINK_OPEN), call_format, arguments_key)
    if cache_points:
        messages = chat.messages
        leading = next((i for i, m in enumerate(messages) if m.role not in ("system", "developer")), len(messages))
        last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=0)
        automatic = {leading, last_user} if last_user > leading else {leading}
        prompt.cache_points = tuple(sorted({n for k in automatic if (n := shared_prefix(model, chat, messages[:k], ids))}))
        prompt.cache_marks = tuple(sorted({n for k in chat.cache_marks if (n := shared_prefix(model, chat, messages[:k], ids))}))
    return prompt


def shared_prefix(model: Model, chat: ChatRequest, messages: list[Message], ids: list[int]) -> int:
    """How many tokens of ``ids`` (a whole prompt) the rendering of just ``messages`` (its first messages, without
    the assistant turn's opening) shares: the prompt prefix that ends at that message boundary, as every request
    continuing these messages tokenizes it. 0 when the template renders the part differently (a few tokens that
    tokenize together across the boundary are left out)."""
    try:
        prefix = model.encode_text(_render_text(model, chat, messages, add_generation_prompt=False), "messages")
    except Exception:  # a template that cannot render this part alone (one that wants a user message, say)
        return 0
    n = len(os.path.commonprefix([prefix, ids]))
    return n if n >= len(prefix) - 4 and n < len(ids) else 0


def conversation_so_far(model: Model, chat: ChatRequest, answer: str) -> list[int]:
    """The tokens that the next turn of this conversation (after ``answer``) starts with: what the prompt cache
    can hold so that the next turn prefills only its new message."""
    history = chat.messages + [Message("assistant", answer)]
    closed = model.encode_text(_render_text(model, chat, history, add_generation_prompt=False), "messages")
    following = model.encode_text(_render_text(model, chat, history + [Message("user", "?")]), "messages")
    return closed[: len(os.path.commonprefix([closed, following]))]


def call_opening(prompt: ChatPrompt, name: str | None, in_reasoning: bool | None = None) -> str:
    """The text that opens a forced call, up to its arguments (or up to the name when ``name`` is None);
    ``in_reasoning``: whether the text before it is inside an open reasoning block (default: the prompt's)."""
    skip_thinking = f"{THINK_CLOSE}\n\n" if (prompt.in_reasoning if in_reasoning is None else in_reasoning) else ""
    head = CALL_OPEN + "\n" if prompt.call_format == "hermes" else ""
    if name is None:
        return f'{skip_thinking}{head}{{"name": "'
    return f'{skip_thinking}{head}{{"name": {_dumps(name)}, "{prompt.arguments_key}": '


def json_opening(schema: dict[str, Any] | None) -> str:
    """How a JSON value for ``schema`` starts: its bracket and, when the schema requires
    properties, the first one's key (small models stay on track with a nudge)."""
    schema = schema or {}
    if schema.get("type") == "array":
        return "["
    required = [r for r in schema.get("required") or [] if isinstance(r, str)]
    if not required:
        return "{"
    first = required[0]
    spec = (schema.get("properties") or {}).get(first)
    quote = '"' if isinstance(spec, dict) and (spec.get("type") == "string" or
                                               (spec.get("enum") and all(isinstance(v, str) for v in spec["enum"]))) else ""
    return f"{{{_dumps(first)}: {quote}"
