"""The protocol-neutral vocabulary every layer shares: a generation request, and the events of its answer.

The engine turns a :class:`GenerationRequest` into :class:`TextDelta`,
:class:`Finish`, :class:`Done` and :class:`Heartbeat` events; the chat
pipeline adds :class:`ReasoningDelta` and :class:`ToolCall`, parsed out of the
text. Each protocol formats these events and nothing else. An
:class:`EventStream` is the one way such a stream is ended and observed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from .errors import GenerationFailed, InvalidModelOutput


# ----------------------------------------------------------------------------- the request
@dataclass(frozen=True)
class Constraint:
    """The completion's text must match ``grammar`` (an llguidance grammar; engine/constraints.py builds them from a
    JSON Schema, a regex, a list of choices or a Lark grammar). ``prefix``: text the prompt already wrote as the start
    of the match (a prefilled ``{"city": "``). The engine ends the completion ("stop") as soon as the grammar is
    complete, and never lets the model write a token the grammar forbids. With ``json``, the last tokens of the
    budget close the value wherever the grammar allows it, so that ``max_tokens`` rarely cuts it."""

    grammar: str
    prefix: str = ""
    json: bool = False  # the grammar is JSON: near max_tokens the engine closes open strings, objects and arrays


@dataclass
class GenerationRequest:
    """What to generate, independent of any wire protocol."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    end_token_ids: list[int] = field(default_factory=list)
    n: int = 1
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per token (with logprobs): read from the step's whole-vocabulary logits
    min_tokens: int = 0
    constraint: Constraint | None = None  # token-level: the text always matches the grammar
    # Prompt prefixes (token counts) that end at a message boundary: the prompt cache may keep the model state
    # after them. ``cache_points`` are found automatically (system + tools, the conversation before the last user
    # message); ``cache_marks`` are the client's own (Anthropic cache_control, OpenAI prompt_cache_key).
    cache_points: tuple[int, ...] = ()
    cache_marks: tuple[int, ...] = ()

    @property
    def greedy(self) -> bool:
        # A nucleus below 1e-6 holds the top token alone (its probability is at least 1 / vocabulary size): greedy,
        # and CTranslate2 would refuse it once rounded to float32 zero.
        return self.temperature == 0 or self.top_k == 1 or self.top_p < 1e-6


# ----------------------------------------------------------------------------- the events
@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the likeliest (token id, logprob) of the step, best first


@dataclass(frozen=True)
class TextDelta:
    """New answer text of completion ``index``; ``logprobs`` covers the tokens that produced it."""

    index: int
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class ReasoningDelta:
    """New reasoning ("thinking") text of completion ``index``."""

    index: int
    text: str


@dataclass(frozen=True)
class ToolCall:
    """A complete, validated tool call of completion ``index``.

    ``arguments`` is JSON text of an object; ``fragments`` are pieces that
    join to it, in the order the model wrote them (for streaming).
    """

    index: int
    call_index: int
    id: str
    name: str
    arguments: str
    fragments: tuple[str, ...]


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a tool call's arguments, as it is generated (a constrained call streams this way); the call's
    :class:`ToolCall` follows once it is complete. Every delta names its call, so a formatter opens the call at
    the first one."""

    index: int
    call_index: int
    id: str
    name: str
    fragment: str


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# Why an answer ended, in the neutral words each protocol then names (OpenAI's finish_reason,
# Anthropic's stop_reason, the Responses status). Decided here, once, for every protocol.
END_TURN = "end_turn"  # the model ended its turn (or the client or the server cancelled it)
STOP_SEQUENCE = "stop_sequence"  # one of the request's stop strings
MAX_TOKENS = "max_tokens"  # the completion budget ran out
TOOL_USE = "tool_use"  # the answer calls tools, for the client to run
ENDINGS = {"stop": END_TURN, "cancelled": END_TURN, "stop_sequence": STOP_SEQUENCE, "length": MAX_TOKENS, "tool_calls": TOOL_USE}


@dataclass(frozen=True)
class Finish:
    """Completion ``index`` ended. ``reason``: stop, length, stop_sequence, cancelled, error;
    the chat pipeline adds tool_calls and invalid_output (a forced call whose arguments max_tokens cut)."""

    index: int
    reason: str
    completion_tokens: int
    stop_sequence: str | None = None
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.reason in ("error", "invalid_output")

    @property
    def ending(self) -> str:
        """Why a completion that did not fail ended: END_TURN, STOP_SEQUENCE, MAX_TOKENS or TOOL_USE."""
        return ENDINGS[self.reason]

    def after_tool_calls(self) -> Finish:
        """The finish of a completion that made tool calls: it ended for the client to run them, unless cut or failed."""
        return replace(self, reason="tool_calls") if self.reason in ("stop", "stop_sequence", "cancelled") else self

    def raise_failure(self) -> None:
        """A failed completion raises the error every protocol renders: before the first byte as an HTTP
        error, mid-stream as its error event (a forced call cut by max_tokens cannot be returned)."""
        if self.reason == "invalid_output":
            raise InvalidModelOutput(self.error or "invalid output")
        if self.reason == "error":
            raise GenerationFailed(self.error)


@dataclass(frozen=True)
class Done:
    """The whole request ended; exact token counts over all completions."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens read from the prompt cache (included in prompt_tokens)
    cache_write_tokens: int = 0  # prompt tokens whose state this request stored in the cache


@dataclass(frozen=True)
class Heartbeat:
    """Nothing new for a while; lets a stream write a keep-alive."""


@dataclass(frozen=True)
class Planned(Heartbeat):
    """The engine scheduled the request: how much of its prompt the prompt cache reads or stores (as its Done will
    say). A heartbeat to every consumer that does not need it; Anthropic's ``message_start`` carries it."""

    cached_tokens: int = 0
    cache_write_tokens: int = 0


Event = TextDelta | Finish | Done | Heartbeat  # what the engine yields
ChatEvent = Event | ReasoningDelta | ToolCall | ToolCallDelta  # what the chat pipeline yields


# ----------------------------------------------------------------------------- streams of events
E = TypeVar("E")


class EventStream(Generic[E]):
    """A stream of events, and the one way to end and observe it.

    ``close()`` stops the work behind the stream (``cancel``), also when the
    stream was never iterated (a client gone before its first byte), which a
    generator's own ``finally`` cannot do. ``cancel()`` asks the work to stop
    early but keeps the stream readable to its final events. ``watch()``
    observes it (metrics) without wrapping it. A stream read to its end closes
    itself.
    """

    def __init__(self, events: Iterator[E], cancel: Callable[[], None] = lambda: None):
        self._events = events
        self._cancel = cancel
        self._watchers: list[Callable[[E], None]] = []
        self._on_close: list[Callable[[], None]] = []
        self._closed = False

    def __iter__(self) -> EventStream[E]:
        return self

    def __next__(self) -> E:
        try:
            event = next(self._events)
        except StopIteration:
            self.close()
            raise
        for watcher in self._watchers:
            watcher(event)
        return event

    def watch(self, on_event: Callable[[E], None] | None = None, on_close: Callable[[], None] | None = None) -> EventStream[E]:
        """Call ``on_event`` with every event read, and ``on_close`` once when the stream ends."""
        if on_event is not None:
            self._watchers.append(on_event)
        if on_close is not None:
            self._on_close.append(on_close)
        return self

    def cancel(self) -> None:
        self._cancel()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._cancel()
        close = getattr(self._events, "close", None)
        if close is not None:
            close()
        for on_close in self._on_close:
            on_close()


def collect(events: Iterator[Event], n: int) -> tuple[list[str], list[Finish], Done, list[list[TokenLogprob]]]:
    """Drain an event stream into texts, finishes, totals and logprobs (non-streaming responses)."""
    texts = [[] for _ in range(n)]
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
    finishes: list[Finish | None] = [None] * n
    done = None
    for event in events:
        if isinstance(event, TextDelta):
            texts[event.index].append(event.text)
            logprobs[event.index].extend(event.logprobs)
        elif isinstance(event, Finish):
            finishes[event.index] = event
        elif isinstance(event, Done):
            done = event
    return ["".join(t) for t in texts], finishes, done, logprobs
