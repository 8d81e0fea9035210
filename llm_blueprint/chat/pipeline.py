"""One chat request's generation: prompt, engine, parsing, and structured output guaranteed token by token.

Two ways to run, chosen by the request:

- free: the model answers; :class:`OutputParser` splits its text into answer,
  reasoning and tool calls as it streams;
- structured: a forced call (``tool_choice`` required / a named tool /
  Anthropic ``any`` or ``tool``) or a JSON answer (``response_format``,
  Anthropic ``output_config.format``, Responses ``text.format``). The server
  writes a forced call's opening itself (prefill) up to the arguments object,
  so the model only writes the arguments; when several tools are allowed, the
  model's likelihood of each name after the opening picks one, so the name is
  always one of them. The arguments (or the JSON answer) are then generated
  under a token-level constraint compiled from the JSON Schema
  (engine/constraints.py): the engine never keeps a token the schema forbids,
  and ends the completion when the value is complete. So the value always
  validates, and it streams as it is generated (text deltas, or tool-call
  argument deltas).

With ``tool_choice`` auto and the Hermes call format (``<tool_call>``), the
model writes freely until it opens a call: ``<tool_call>`` is an internal stop
string, and the call then runs as a forced one would from that point (the name
picked among the allowed tools, the arguments under the tool's schema); with
parallel calls allowed, the model then goes on after the call (it may open
another one, answer, or end). Other call formats (a bare JSON answer, Gemma's
``tool_code``) are parsed from the free text as the model wrote them.

The one way to miss: ``max_tokens`` ends the value before it closes. A JSON
answer is then returned as cut (finish reason ``length``), as the hosted APIs
do; a forced call, whose arguments must parse, fails with ``invalid_output``
(422) and says to raise ``max_tokens``. A schema the matcher cannot enforce
is refused up front (400, chat/conversation.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from jsonschema import validators
from jsonschema.exceptions import best_match

from ..engine.constraints import json_schema_grammar, starts_a_match, vocabulary_for
from ..engine.model import Model
from ..errors import InvalidRequest
from ..events import (
    ChatEvent,
    Constraint,
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
    ToolCallDelta,
    new_call_id,
)
from .conversation import ChatRequest
from .output_parser import CALL_CLOSE, CALL_OPEN, THINK_CLOSE, OutputParser, Piece
from .prompt import ChatPrompt, call_opening, conversation_so_far, json_opening

log = logging.getLogger(__name__)


def schema_problem(value: Any, schema: dict[str, Any] | None) -> str | None:
    """Why ``value`` does not validate against ``schema`` (None when it does)."""
    if not schema:
        return None
    error = best_match(validators.validator_for(schema)(schema).iter_errors(value))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{error.message} (at /{where})" if where else error.message


class GenerationService(Protocol):
    """What a chat's generation needs of the model side: the Runtime (its only door to an engine, with the
    metrics) or, in benchmarks and tests, an Engine itself."""

    model: Model

    def generate(self, request: GenerationRequest) -> EventStream[Event]: ...

    def validate(self, request: GenerationRequest) -> None: ...

    def warm(self, ids: list[int]) -> None: ...

    def score_continuations(self, prompt_ids: list[int], continuations: list[list[int]]) -> list[float]: ...


class ChatStream(EventStream[ChatEvent]):
    """The events of one chat request. Closing or cancelling it acts on its generation, even before the first
    event was read."""

    def __init__(self, service: GenerationService, chat: ChatRequest, prompt: ChatPrompt, request: GenerationRequest,
                 reasoning: bool = True):
        self.service = service
        self._generate = service.generate
        self.chat = chat
        self.prompt = prompt
        self.request = request
        self.reasoning = reasoning
        self._unsent_logprobs: dict[int, tuple[TokenLogprob, ...]] = {}  # by completion: see _pieces
        # The generation starts now, so typed errors (context too long, overloaded) reach the client
        # as an HTTP error before any byte of a stream.
        forced = bool(chat.tool_choice.forced and chat.active_tools)
        if forced or chat.response_format is not None:
            if request.n > 1:
                raise InvalidRequest("n > 1 is not supported with a forced tool call or a JSON response_format", param="n")
            service.validate(request)  # the client's own budget must fit: the generation runs a prefilled copy of it
            self._current = self._generate(self._structured_request(forced))
            events = self._structured(forced)
        elif request.n == 1 and chat.active_tools and prompt.call_format == "hermes" and CALL_OPEN not in request.stop:
            self._current = self._generate(dataclasses.replace(request, stop=[*request.stop, CALL_OPEN]))
            events = self._auto()
        else:
            self._current = self._generate(request)
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
                yield from self._pieces(pieces, event.logprobs, stream, event.index)
            elif isinstance(event, Finish):
                parser = parsers[event.index]
                pieces = parser.finish()
                answer.extend(p.text for p in pieces if isinstance(p, TextDelta))
                yield from self._pieces(pieces, (), stream, event.index, final=True)
                ended = event.after_tool_calls() if parser.calls else event
                yield ended
            else:
                yield event
        if self.request.n == 1 and ended is not None and ended.reason in ("stop", "length") and self.request.cache_points:
            self._hold_conversation("".join(answer))

    def _auto(self) -> Iterator[ChatEvent]:
        """``tool_choice`` auto: free text until the model opens a call (the engine stops at ``<tool_call>``), then
        the call under its tool's schema, then (parallel calls allowed) the model goes on after it."""
        chat, request, model = self.chat, self.request, self.service.model
        parser = OutputParser(chat.active_tools, self.reasoning, self.prompt.in_reasoning)
        written: list[str] = []  # what the model and the calls wrote after the prompt: the continuations' prompt
        used, first_done, answer = 0, None, []
        stream = self._current
        while True:
            finish = None
            for event in stream:
                if isinstance(event, TextDelta):
                    written.append(event.text)
                    pieces = parser.feed(event.text)
                    answer.extend(p.text for p in pieces if isinstance(p, TextDelta))
                    yield from self._pieces(pieces, event.logprobs, stream, 0)
                elif isinstance(event, Finish):
                    finish = event
                elif isinstance(event, Done):
                    used += event.completion_tokens
                    first_done = first_done or event
                else:
                    yield event
            if finish is not None and finish.stop_sequence == CALL_OPEN and used < request.max_tokens:
                call = yield from self._auto_call(parser, "".join(written), request.max_tokens - used)
                if isinstance(call, Finish):  # failed or cut
                    yield call
                    break
                call_text, call_tokens = call
                used += call_tokens
                written.append(call_text)
                parser.calls += 1
                parser.after_block = True
                ids = model.encode_text(self.prompt.text + "".join(written)) if chat.tool_choice.parallel else []
                budget = min(request.max_tokens - used, model.context_length - len(ids))
                if not ids or budget < 1:  # one call asked for, or no room for more
                    yield Finish(0, "tool_calls", used)
                    break
                stream = self._current = self._generate(dataclasses.replace(
                    request, prompt_ids=ids, max_tokens=budget, min_tokens=0, stop=[*request.stop, CALL_OPEN]))
                continue
            pieces = parser.finish()
            answer.extend(p.text for p in pieces if isinstance(p, TextDelta))
            yield from self._pieces(pieces, (), stream, 0, final=True)
            if finish is None:
                finish = Finish(0, "error", used, error="generation ended early")
            ended = dataclasses.replace(finish, completion_tokens=used, stop_sequence=(
                None if finish.stop_sequence == CALL_OPEN else finish.stop_sequence))
            if ended.reason == "stop_sequence" and ended.stop_sequence is None:  # the call opening ended the budget
                ended = dataclasses.replace(ended, reason="length")
            yield ended.after_tool_calls() if parser.calls else ended
            if not parser.calls and ended.reason in ("stop", "length") and request.cache_points:
                self._hold_conversation("".join(answer))
            break
        first_done = first_done or Done(0, 0)
        yield Done(len(self.prompt.ids), used, first_done.cached_tokens, first_done.cache_write_tokens)

    def _auto_call(self, parser: OutputParser, written: str, budget: int):
        """The call the model opened after ``written``, generated as a forced call; its events, then returns
        (the call's text as the model's template writes it, its tokens), or the Finish that ended it."""
        in_reasoning = parser.state == "reasoning"
        self._current = self._generate(self._structured_request(
            True, self.prompt.text + written, in_reasoning, budget))
        for event in self._structured(True, parser.calls):
            if isinstance(event, Finish):
                if event.reason != "tool_calls":
                    return event
            elif isinstance(event, Done):
                tokens = event.completion_tokens
            else:
                if isinstance(event, ToolCall):
                    arguments = event.arguments
                yield event
        return f"{self.head}{arguments}}}\n{CALL_CLOSE}", tokens

    def _hold_conversation(self, answer: str) -> None:
        """Ask the engine to hold this conversation with its answer, for the next turn (an idle replica does it)."""
        try:
            ids = conversation_so_far(self.service.model, self.chat, answer)
        except Exception:  # a template that cannot render the answered conversation: nothing to hold
            return
        if len(ids) > max(self.request.cache_points):
            self.service.warm(ids)

    def _pieces(self, pieces: list[Piece], logprobs: tuple[TokenLogprob, ...], stream, index: int,
                final: bool = False) -> Iterator[ChatEvent]:
        """The parser's pieces as events. A delta's token log-probabilities go with its first text; those of a delta
        whose text the parser holds back (a space, the start of a possible marker) wait for the next text, and those
        of text that never shows (trailing whitespace) end the completion in an empty delta: every answer token keeps
        its entry (reasoning and tool-call tokens have none, as in OpenAI's API)."""
        parallel = self.chat.tool_choice.parallel
        logprobs = self._unsent_logprobs.pop(index, ()) + tuple(logprobs)
        for piece in pieces:
            if isinstance(piece, TextDelta):
                yield dataclasses.replace(piece, logprobs=logprobs)
                logprobs = ()
            elif isinstance(piece, ToolCall):
                if parallel or piece.call_index == 0:
                    yield piece
                    if not parallel and self.request.n == 1:
                        stream.cancel()  # one call was asked for: stop generating
            else:
                yield piece
        if logprobs and not pieces:
            if final:
                yield TextDelta(index, "", logprobs)
            else:
                self._unsent_logprobs[index] = logprobs

    # Forced call or JSON output ------------------------------------------------
    def _structured_request(self, forced: bool, text: str | None = None, in_reasoning: bool | None = None,
                            budget: int | None = None) -> GenerationRequest:
        """The tool (forced call) or schema (JSON output), the prefilled prompt, and the constrained request.
        ``text``: what precedes the call (default: the prompt; an auto call: the prompt and what the model wrote);
        ``budget``: the tokens left for it (default: ``max_tokens``)."""
        chat, model = self.chat, self.service.model
        self.tool_name = None
        before = self.prompt.text if text is None else text
        if forced:
            self.tool_name = chat.tool_choice.name or self._choose_tool(before, in_reasoning)
            self.schema = chat.tool(self.tool_name).parameters
            head = call_opening(self.prompt, self.tool_name, in_reasoning)
        else:
            self.schema = chat.response_format.schema
            head = f"{THINK_CLOSE}\n\n" if self.prompt.in_reasoning else ""
        self.head = head
        grammar = json_schema_grammar(self.schema)
        vocabulary = vocabulary_for(model.tokenizer, model.end_token_ids)
        # The value's first key, written by the server, keeps a small model on track; the grammar must allow it
        # (it orders properties as the schema lists them), else the value starts with its bracket or nothing.
        nudge = json_opening(self.schema)
        self.opening = next(o for o in (nudge, nudge[:1], "") if starts_a_match(vocabulary, grammar, o))
        prefilled = model.encode_text(before + head + self.opening)
        self.prefilled_tokens = len(prefilled) - (len(self.prompt.ids) if text is None else len(model.encode_text(before)))
        room = model.context_length - len(prefilled)
        budget = self.request.max_tokens if budget is None else budget
        return dataclasses.replace(self.request, prompt_ids=prefilled, max_tokens=max(1, min(budget, room)), min_tokens=0,
                                   n=1, stop=[], constraint=Constraint(grammar, self.opening, json=True))

    def _structured(self, forced: bool, call_index: int = 0) -> Iterator[ChatEvent]:
        name, opening = self.tool_name, self.opening
        call_id = new_call_id()
        parts: list[str] = []
        finish: Finish | None = None
        completion_tokens = 0
        engine_done = Done(0, 0)

        def delta(text: str, logprobs=()) -> ChatEvent:
            parts.append(text)
            return ToolCallDelta(0, call_index, call_id, name, text) if forced else TextDelta(0, text, logprobs)

        if opening:
            yield delta(opening)
        for event in self._current:
            if isinstance(event, Heartbeat):
                yield event
            elif isinstance(event, TextDelta):
                yield delta(event.text, event.logprobs)
            elif isinstance(event, Finish):
                finish = event
            elif isinstance(event, Done):
                completion_tokens, engine_done = event.completion_tokens, event
        # The prefilled part of the answer counts as output, so input_tokens stays the prompt's own count.
        done = Done(len(self.prompt.ids), completion_tokens + self.prefilled_tokens, engine_done.cached_tokens,
                    engine_done.cache_write_tokens)
        text = "".join(parts)
        if finish is None or finish.failed:
            yield Finish(0, "error", completion_tokens, error=finish.error if finish else "generation ended early")
        elif finish.reason == "length" and forced:
            yield Finish(0, "invalid_output", completion_tokens, error=(
                f"max_tokens ({self.request.max_tokens}) was reached before the arguments for tool {name!r} were "
                "complete; raise max_tokens"))
        elif finish.reason in ("length", "cancelled"):  # cut by max_tokens: returned as cut, like the hosted APIs
            yield Finish(0, finish.reason, completion_tokens)
        else:
            self._check(text)
            if forced:
                yield ToolCall(0, call_index, call_id, name, text, tuple(parts))
                yield Finish(0, "tool_calls", completion_tokens)
            else:
                yield Finish(0, "stop", completion_tokens)
        yield done

    def _check(self, text: str) -> None:
        """The grammar guarantees the value; a value that still fails ``jsonschema`` means the two disagree on a
        keyword (e.g. a ``format``), which is logged."""
        try:
            problem = schema_problem(json.loads(text), self.schema)
        except ValueError as exc:
            problem = f"not JSON ({exc})"
        if problem:
            log.warning("a constrained value does not validate (%s): %s", problem, text[:200])

    def _choose_tool(self, before: str, in_reasoning: bool | None = None) -> str:
        """The allowed tool the model itself finds likeliest after ``before`` and a call's opening."""
        tools = self.chat.active_tools
        if len(tools) == 1:
            return tools[0].name
        model = self.service.model
        head = before + call_opening(self.prompt, None, in_reasoning)
        candidates = [model.encode_text(head + json.dumps(t.name)[1:]) for t in tools]  # name + closing quote
        common = len(os.path.commonprefix(candidates))
        scores = self.service.score_continuations(candidates[0][:common], [c[common:] for c in candidates])
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
