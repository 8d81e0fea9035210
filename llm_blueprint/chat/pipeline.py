"""One chat request's generation: prompt, engine, parsing, forced calls and JSON output, retries.

Three ways to run, chosen by the request:

- free: the model answers; :class:`OutputParser` splits its text into answer,
  reasoning and tool calls as it streams;
- forced call (``tool_choice`` required / a named tool / Anthropic ``any``):
  the server writes the call's opening itself (prefill) up to the arguments
  object, so the model only writes the arguments; when several tools are
  allowed, the model's likelihood of each name after the opening picks one;
- JSON output (``response_format``): the prefill opens the JSON value.

CTranslate2 has no logits hook, so the model cannot be constrained token by
token. For the last two the engine stops as soon as the JSON value closes; the
value is parsed and checked against its JSON Schema with ``jsonschema``; an
invalid value is regenerated (sampled, since a greedy retry would repeat
itself) up to ``attempts`` times, and then the request fails with
``invalid_output``. A first JSON answer cut by ``max_tokens`` is returned as
cut (finish reason ``length``), as the hosted APIs do. Nothing of a forced call or a JSON answer is sent before it
validated, so a stream never carries output that is later withdrawn.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from jsonschema import validators
from jsonschema.exceptions import best_match

from ..engine.generation import Engine
from ..errors import InvalidRequest
from ..events import (
    ChatEvent,
    Done,
    Event,
    EventStream,
    Finish,
    GenerationRequest,
    Heartbeat,
    ReasoningDelta,
    TextDelta,
    TokenLogprob,
    ToolCall,
    new_call_id,
)
from .conversation import ChatRequest
from .output_parser import THINK_CLOSE, OutputParser, Piece
from .prompt import ChatPrompt, call_opening, conversation_so_far, json_opening

RETRY_TEMPERATURE = 0.7


def schema_problem(value: Any, schema: dict[str, Any] | None) -> str | None:
    """Why ``value`` does not validate against ``schema`` (None when it does)."""
    if not schema:
        return None
    error = best_match(validators.validator_for(schema)(schema).iter_errors(value))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{error.message} (at /{where})" if where else error.message


class ChatStream(EventStream[ChatEvent]):
    """The events of one chat request. Closing or cancelling it acts on whichever generation is
    running (a structured answer may take several), even before the first event was read."""

    def __init__(self, engine: Engine, generate: Callable[[GenerationRequest], EventStream[Event]], chat: ChatRequest,
                 prompt: ChatPrompt, request: GenerationRequest, reasoning: bool = True, attempts: int = 3):
        self.engine = engine
        self._generate = generate
        self.chat = chat
        self.prompt = prompt
        self.request = request
        self.reasoning = reasoning
        self.attempts = max(1, attempts)
        # The first generation starts now, so typed errors (context too long, overloaded) reach the client
        # as an HTTP error before any byte of a stream.
        forced = bool(chat.tool_choice.forced and chat.active_tools)
        if forced or chat.response_format is not None:
            if request.n > 1:
                raise InvalidRequest("n > 1 is not supported with a forced tool call or a JSON response_format", param="n")
            engine.validate(request)  # the client's own budget must fit: the attempts run a prefilled copy of it
            self._prepare_constrained(forced)
            self._current = generate(self._attempt(0))
            events = self._constrained(forced)
        else:
            self._current = generate(request)
            events = self._free(self._current)
        super().__init__(events, cancel=lambda: self._current.cancel())
        self.watch(on_close=lambda: self._current.close())

    # Free generation ---------------------------------------------------------
    def _free(self, stream) -> Iterator[ChatEvent]:
        chat = self.chat
        parsers = [OutputParser(chat.active_tools, self.reasoning, self.prompt.in_reasoning, index) for index in range(self.request.n)]
        answer: list[str] = []
        ended = None
        for event in stream:
            if isinstance(event, TextDelta):
                for piece in (pieces := parsers[event.index].feed(event.text)):
                    if isinstance(piece, TextDelta):
                        answer.append(piece.text)
                yield from self._pieces(pieces, event.logprobs, stream)
            elif isinstance(event, Finish):
                parser = parsers[event.index]
                pieces = parser.finish()
                answer.extend(p.text for p in pieces if isinstance(p, TextDelta))
                yield from self._pieces(pieces, (), stream)
                ended = event.after_tool_calls() if parser.calls else event
                yield ended
            else:
                yield event
        if self.request.n == 1 and ended is not None and ended.reason in ("stop", "length") and self.request.cache_points:
            self._hold_conversation("".join(answer))

    def _hold_conversation(self, answer: str) -> None:
        """Ask the engine to hold this conversation with its answer, for the next turn (an idle replica does it)."""
        try:
            ids = conversation_so_far(self.engine.model, self.chat, answer)
        except Exception:  # a template that cannot render the answered conversation: nothing to hold
            return
        if len(ids) > max(self.request.cache_points):
            self.engine.warm(ids)

    def _pieces(self, pieces: list[Piece], logprobs: tuple[TokenLogprob, ...], stream) -> Iterator[ChatEvent]:
        parallel = self.chat.tool_choice.parallel
        for piece in pieces:
            if isinstance(piece, TextDelta):
                yield dataclasses.replace(piece, logprobs=logprobs)  # the delta's tokens go with its first text
                logprobs = ()
            elif isinstance(piece, ToolCall):
                if parallel or piece.call_index == 0:
                    yield piece
                    if not parallel and self.request.n == 1:
                        stream.cancel()  # one call was asked for: stop generating
            else:
                yield piece

    # Forced call or JSON output ------------------------------------------------
    def _prepare_constrained(self, forced: bool) -> None:
        """The tool (forced call) or schema (JSON output), and the prefilled prompt."""
        chat = self.chat
        self.tool_name = None
        if forced:
            self.tool_name = chat.tool_choice.name or self._choose_tool()
            self.schema = chat.tool(self.tool_name).parameters
            self.opening = json_opening(self.schema)
            prefill = call_opening(self.prompt, self.tool_name) + self.opening
        else:
            self.schema = chat.response_format.schema
            self.opening = json_opening(self.schema)
            prefill = (f"{THINK_CLOSE}\n\n" if self.prompt.in_reasoning else "") + self.opening
        self.prefilled_ids = self.engine.model.encode_text(self.prompt.text + prefill)

    def _attempt(self, attempt: int) -> GenerationRequest:
        request = self.request
        room = self.engine.model.context_length - len(self.prefilled_ids)
        gen = dataclasses.replace(request, prompt_ids=self.prefilled_ids, max_tokens=max(1, min(request.max_tokens, room)),
                                  json_prefix=self.opening, n=1, stop=[])
        if attempt:  # sampled, since a greedy retry would write the same thing again; seeded requests stay reproducible
            gen = dataclasses.replace(gen, seed=None if request.seed is None else request.seed + attempt)
            if gen.greedy:
                gen = dataclasses.replace(gen, temperature=RETRY_TEMPERATURE, top_k=0)
        return gen

    def _constrained(self, forced: bool) -> Iterator[ChatEvent]:
        name, schema, opening, ids = self.tool_name, self.schema, self.opening, self.prefilled_ids
        completion_tokens, problem = 0, None
        for attempt in range(self.attempts):
            if attempt:
                self._current.close()
                self._current = self._generate(self._attempt(attempt))
            deltas: list[str] = []
            finish: Finish | None = None
            for event in self._current:
                if isinstance(event, Heartbeat):
                    yield event
                elif isinstance(event, TextDelta):
                    deltas.append(event.text)
                elif isinstance(event, Finish):
                    finish = event
                elif isinstance(event, Done):
                    completion_tokens += event.completion_tokens
            # The prefilled part of the answer counts as output, so input_tokens stays the prompt's own count.
            done = Done(len(self.prompt.ids), completion_tokens + len(ids) - len(self.prompt.ids))
            text = opening + "".join(deltas)
            if finish is None or finish.failed:
                yield Finish(0, "error", completion_tokens, error=finish.error if finish else "generation ended early")
                yield done
                return
            if finish.reason == "length" and not forced and not attempt:  # cut by max_tokens: returned as cut, like the APIs
                yield from self._json_text(opening, deltas)
                yield Finish(0, "length", completion_tokens)
                yield done
                return
            problem = self._problem(text, schema, finish)
            if problem is None:
                if forced:
                    yield ToolCall(0, 0, new_call_id(), name, text, tuple(f for f in [opening, *deltas] if f))
                    yield Finish(0, "tool_calls", completion_tokens)
                else:
                    yield from self._json_text(opening, deltas)
                    yield Finish(0, "stop", completion_tokens)
                yield done
                return
            if finish.reason == "length" and forced:
                break  # the arguments outgrew max_tokens; more attempts with the same budget would be cut again
        what = f"arguments for tool {name!r}" if forced else "JSON output"
        message = f"the model did not produce valid {what} in {attempt + 1} attempt(s): {problem}"
        yield Finish(0, "invalid_output", completion_tokens, error=message)
        yield Done(len(self.prompt.ids), completion_tokens)

    def _json_text(self, opening: str, deltas: list[str]) -> Iterator[TextDelta]:
        for text in [opening, *deltas]:
            if text:
                yield TextDelta(0, text)

    @staticmethod
    def _problem(text: str, schema: dict[str, Any] | None, finish: Finish) -> str | None:
        if finish.reason == "length":
            return "max_tokens was reached before the JSON value was complete; raise max_tokens"
        try:
            value = json.loads(text)
        except ValueError as exc:
            return f"not valid JSON ({exc})"
        return schema_problem(value, schema)

    def _choose_tool(self) -> str:
        """The allowed tool the model itself finds likeliest after a call's opening."""
        tools = self.chat.active_tools
        if len(tools) == 1:
            return tools[0].name
        model = self.engine.model
        head = self.prompt.text + call_opening(self.prompt, None)
        candidates = [model.encode_text(head + json.dumps(t.name)[1:]) for t in tools]  # name + closing quote
        common = len(os.path.commonprefix(candidates))
        scores = self.engine.score_continuations(candidates[0][:common], [c[common:] for c in candidates])
        return tools[max(range(len(tools)), key=scores.__getitem__)].name


@dataclass
class ChoiceResult:
    """One completion of a non-streaming chat response."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: Finish | None = None


def collect_chat(events: Iterator[ChatEvent], n: int) -> tuple[list[ChoiceResult], Done]:
    """Drain a chat stream into its completions (non-streaming responses)."""
    results = [ChoiceResult() for _ in range(n)]
    texts: list[list[str]] = [[] for _ in range(n)]
    reasoning: list[list[str]] = [[] for _ in range(n)]
    done = Done(0, 0)
    for event in events:
        if isinstance(event, TextDelta):
            texts[event.index].append(event.text)
            results[event.index].logprobs.extend(event.logprobs)
        elif isinstance(event, ReasoningDelta):
            reasoning[event.index].append(event.text)
        elif isinstance(event, ToolCall):
            results[event.index].tool_calls.append(event)
        elif isinstance(event, Finish):
            results[event.index].finish = event
        elif isinstance(event, Done):
            done = event
    for i, result in enumerate(results):
        result.text, result.reasoning = "".join(texts[i]), "".join(reasoning[i])
    return results, done
