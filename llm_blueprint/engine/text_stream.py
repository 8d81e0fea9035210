"""From generated token ids to safe text deltas: incremental decoding and stop strings."""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 4


class IncrementalDecoder:
    """Turns token ids into text deltas that are always whole characters.

    Each step decodes a short window of ids twice (with and without the new
    ones) and emits the difference, so word-boundary spaces of SentencePiece
    pieces come out right; the window starts with the last prompt tokens so
    even the first generated piece keeps its leading space. Text ending in an
    incomplete UTF-8 sequence (U+FFFD) is held until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]):
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held at the end; an incomplete trailing character is dropped."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = decode(self._ids[self._prefix_offset:])
        if final:
            new_text = new_text.rstrip(REPLACEMENT_CHAR)
        elif new_text.endswith(REPLACEMENT_CHAR):
            return ""
        if len(new_text) <= len(prefix_text):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text):]


class StopMatcher:
    """Holds back any text that could be the start of a stop string.

    ``feed`` returns ``(text_to_emit, matched_stop_or_None)``. No part of a
    stop string is ever emitted; text before the match is.
    """

    def __init__(self, stops: Sequence[str]):
        self._stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        if not self._stops:
            return text, None
        buffer = self._pending + text
        best_index, best_stop = -1, None
        for stop in self._stops:
            index = buffer.find(stop)
            if index != -1 and (best_index == -1 or index < best_index):
                best_index, best_stop = index, stop
        if best_stop is not None:
            self._pending = ""
            return buffer[:best_index], best_stop
        hold = self._held_suffix_length(buffer)
        self._pending = buffer[len(buffer) - hold:] if hold else ""
        return buffer[:len(buffer) - hold], None

    def flush(self) -> str:
        """At the end of generation a held partial match is ordinary text."""
        pending, self._pending = self._pending, ""
        return pending

    def _held_suffix_length(self, buffer: str) -> int:
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:length]):
                    longest = length
                    break
        return longest
