"""Parsing a completion's text, as it streams, into answer text, reasoning and tool calls.

Formats recognized (the ones small open models actually write):

- reasoning: ``<think>…</think>`` at the start of the answer (or from the
  start, when the chat template itself opened ``<think>``);
- Hermes/Qwen tool calls: ``<tool_call>{"name": …, "arguments": {…}}</tool_call>``,
  one or several;
- a bare JSON answer: ``{"name": …, "arguments"|"parameters": {…}}`` or a list of them;
- Gemma's ``tool_code`` fence: a Python-style call ``name(key=value, …)``.

No character of a call's markup reaches the answer text: text that could be
the start of a marker is held back until it is decided. A block that does not
parse into a call of a known tool with a JSON-object argument is the model's
text after all and is returned as text, verbatim.
"""

from __future__ import annotations

import ast
import json
from typing import Any

from ..events import ReasoningDelta, TextDelta, ToolCall, new_call_id
from .conversation import Tool

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
CODE_OPEN, CODE_CLOSE = "```tool_code", "```"

Piece = TextDelta | ReasoningDelta | ToolCall  # what the parser makes of the text, as the pipeline's own events


def _held_suffix(buffer: str, markers: list[str]) -> int:
    """Length of the longest end of ``buffer`` that could begin one of ``markers``."""
    longest = 0
    for marker in markers:
        for length in range(min(len(marker) - 1, len(buffer)), longest, -1):
            if buffer.endswith(marker[:length]):
                longest = length
                break
    return longest


def _call_from_object(value: Any, tools: dict[str, Tool]) -> tuple[str, str] | None:
    """``(name, arguments JSON)`` from a parsed ``{"name", "arguments"|"parameters"}`` object."""
    if not isinstance(value, dict):
        return None
    name = value.get("name")
    if not isinstance(name, str) and isinstance(value.get("function"), dict):  # {"function": {"name", "arguments"}}
        return _call_from_object(value["function"], tools)
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if name not in tools or not isinstance(arguments, dict):
        return None
    return name, json.dumps(arguments, ensure_ascii=False)


def parse_json_calls(text: str, tools: dict[str, Tool]) -> list[tuple[str, str]] | None:
    """Calls written as one JSON object or a list of them, or None if ``text`` is not that."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    values = value if isinstance(value, list) and value else [value]
    calls = [_call_from_object(v, tools) for v in values]
    return None if any(c is None for c in calls) else calls


def parse_tool_code(code: str, tools: dict[str, Tool]) -> tuple[str, str] | None:
    """A ``name(key=literal, …)`` call; a lone positional argument fills a one-property schema."""
    try:
        tree = ast.parse(code.strip(), mode="eval")
    except SyntaxError:
        return None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.func.id not in tools:
        return None
    name = call.func.id
    arguments: dict[str, Any] = {}
    try:
        if call.args:
            properties = list((tools[name].parameters.get("properties") or {}).keys())
            if len(call.args) != 1 or call.keywords or len(properties) != 1:
                return None
            arguments[properties[0]] = ast.literal_eval(call.args[0])
        for keyword in call.keywords:
            if keyword.arg is None:
                return None
            arguments[keyword.arg] = ast.literal_eval(keyword.value)
    except (ValueError, SyntaxError, TypeError):
        return None
    try:
        return name, json.dumps(arguments, ensure_ascii=False)
    except (TypeError, ValueError):  # a literal JSON cannot hold (a set, bytes)
        return None


class OutputParser:
    """Incremental parser for completion ``index``; feed it text deltas, then call ``finish``.

    ``tools``: the callable tools (none: calls are not parsed); ``reasoning``:
    whether ``<think>`` blocks are parsed; ``in_reasoning``: the prompt already
    opened one. ``calls`` counts the tool calls parsed so far.
    """

    def __init__(self, tools: list[Tool], reasoning: bool = True, in_reasoning: bool = False, index: int = 0):
        self.index = index
        self.tools = {t.name: t for t in tools}
        self.reasoning = reasoning
        self.state = "reasoning" if in_reasoning and reasoning else "start"
        self.buffer = ""
        self.calls = 0
        self.after_block = False  # whitespace right after a reasoning block or call is not answer text
        self.pending_space = ""  # trailing whitespace, held in case a call follows
        self.space_before_block = ""

    @property
    def _markers(self) -> list[str]:
        return [CALL_OPEN, CODE_OPEN] if self.tools else []

    def feed(self, text: str) -> list[Piece]:
        self.buffer += text
        return self._drain(final=False)

    def finish(self) -> list[Piece]:
        pieces = self._drain(final=True)
        if self.pending_space and not self.calls:
            pieces.append(TextDelta(self.index, self.pending_space))
        self.pending_space = ""
        return pieces

    # States ------------------------------------------------------------------
    def _drain(self, final: bool) -> list[Piece]:
        pieces: list[Piece] = []
        while True:
            before = (self.state, len(self.buffer))
            getattr(self, f"_on_{self.state}")(pieces, final)
            if (self.state, len(self.buffer)) == before:
                return pieces

    def _on_start(self, pieces: list[Piece], final: bool) -> None:
        head = self.buffer.lstrip()
        if not head:
            if final:
                self.buffer = ""
            return
        if self.reasoning and head.startswith(THINK_OPEN):
            self.buffer = head[len(THINK_OPEN):]
            self.state = "reasoning"
        elif self.reasoning and THINK_OPEN.startswith(head) and not final:
            return  # could still become <think>
        elif self.tools and head[0] in "{[":
            self.state = "bare_json"
        else:
            self.state = "text"

    def _on_reasoning(self, pieces: list[Piece], final: bool) -> None:
        index = self.buffer.find(THINK_CLOSE)
        if index != -1:
            self._reasoning(pieces, self.buffer[:index])
            self.buffer = self.buffer[index + len(THINK_CLOSE):]
            self.state, self.after_block = "start", True
            return
        hold = 0 if final else _held_suffix(self.buffer, [THINK_CLOSE])
        self._reasoning(pieces, self.buffer[:len(self.buffer) - hold])
        self.buffer = self.buffer[len(self.buffer) - hold:]

    def _on_text(self, pieces: list[Piece], final: bool) -> None:
        found = [(self.buffer.find(m), m) for m in self._markers]
        found = [(i, m) for i, m in found if i != -1]
        if found:
            index, marker = min(found)
            self._text(pieces, self.buffer[:index])
            # Whitespace before a call is not answer text, unless the block turns out not to be a call.
            self.space_before_block, self.pending_space = self.pending_space, ""
            self.buffer = self.buffer[index + len(marker):]
            self.state = "call" if marker == CALL_OPEN else "tool_code"
            return
        hold = 0 if final else _held_suffix(self.buffer, self._markers)
        self._text(pieces, self.buffer[:len(self.buffer) - hold])
        self.buffer = self.buffer[len(self.buffer) - hold:]

    def _on_call(self, pieces: list[Piece], final: bool) -> None:
        self._block(pieces, final, CALL_OPEN, CALL_CLOSE, lambda body: parse_json_calls(body.strip(), self.tools))

    def _on_tool_code(self, pieces: list[Piece], final: bool) -> None:
        def parse(body: str):
            call = parse_tool_code(body, self.tools)
            return [call] if call else None

        self._block(pieces, final, CODE_OPEN, CODE_CLOSE, parse)

    def _on_bare_json(self, pieces: list[Piece], final: bool) -> None:
        if not final:
            return
        calls = parse_json_calls(self.buffer.strip(), self.tools)
        if calls:
            self._calls(pieces, calls)
        else:
            self._text(pieces, self.buffer)
        self.buffer, self.state = "", "text"

    def _block(self, pieces: list[Piece], final: bool, opener: str, closer: str, parse) -> None:
        index = self.buffer.find(closer)
        if index == -1 and not final:
            return
        body = self.buffer if index == -1 else self.buffer[:index]
        calls = parse(body)
        if calls:
            self._calls(pieces, calls)
        else:  # not a call after all: the model's own text, verbatim
            self.pending_space = self.space_before_block
            self._text(pieces, opener + body + ("" if index == -1 else closer))
        self.buffer = "" if index == -1 else self.buffer[index + len(closer):]
        self.state = "text"

    # Output ------------------------------------------------------------------
    def _reasoning(self, pieces: list[Piece], text: str) -> None:
        if text:
            pieces.append(ReasoningDelta(self.index, text))

    def _calls(self, pieces: list[Piece], calls: list[tuple[str, str]]) -> None:
        for name, arguments in calls:
            pieces.append(ToolCall(self.index, self.calls, new_call_id(), name, arguments, (arguments,)))
            self.calls += 1
        self.after_block = True

    def _text(self, pieces: list[Piece], text: str) -> None:
        if self.after_block:
            text = text.lstrip()
            if not text:
                return
            self.after_block = False
        if not text:
            return
        stripped = text.rstrip()
        if not stripped:
            self.pending_space += text
            return
        pieces.append(TextDelta(self.index, self.pending_space + stripped))
        self.pending_space = text[len(stripped):]
