"""Token-level constraints: a completion whose text must match a grammar (JSON Schema, regex, choices, Lark).

Built on llguidance's matcher. CTranslate2 has no logits hook, so the engine
applies a constraint after the fact, per step (generation.py, ``_Entry``):
a sampled token the grammar allows is kept; a forbidden one is dropped, the
entry stops, and it resumes from prompt + kept tokens + the best allowed
token (:meth:`TokenMatcher.choose`: the highest allowed logit when greedy,
else a draw from the allowed part of the distribution at the request's
temperature, top-k and top-p), followed by any tokens the grammar forces.
The entry ends ("stop") as soon as the grammar is complete.

The grammars here are llguidance's own text; :func:`json_schema_grammar` and
friends build them and raise :class:`InvalidRequest` (a 400) for what the
matcher cannot compile, naming the problem, rather than falling back to
unconstrained output.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Iterable
from typing import Any

import llguidance
import numpy as np

from ..errors import InvalidRequest
from ..events import Constraint, GenerationRequest
from .tokenizer import Tokenizer

# JSON is written on one line with fixed separators (``{"a": 1, "b": [2, 3]}``, as json.dumps writes it): between two
# tokens the grammar then forces the separator and the next key instead of allowing any whitespace, so where the
# model wanted something else (another key, a closing brace) the forced text is written at once. With flexible
# whitespace the best allowed token there is a space, and each one costs a resume (measured: a forced call's 4-7
# resumes on 16-22 tokens were mostly spaces).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
NUMBER_BYTES = frozenset(b"0123456789.eE+-")
LONGEST_NUMBER = 20  # characters; a model writing more is repeating a digit ("11.7888888…"): the number is ended


class ConstraintVocabulary:
    """The model's tokens as the matcher sees them; built once per model (~0.2 s for a 49k vocabulary)."""

    def __init__(self, tokenizer: Tokenizer, end_token_ids: Iterable[int]):
        self.size = tokenizer.vocab_size
        self.end_ids = sorted(i for i in end_token_ids if i is not None)
        self.tokenizer = tokenizer
        view = _TokenizerView(tokenizer, self.end_ids)
        self.lltokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(view), n_vocab=self.size,
                                                  eos_token=self.end_ids or None)
        special = set(view.special_token_ids)
        self.token_bytes = [b"" if i in special else view.tokens[i] for i in range(self.size)]
        # Tokens that only close JSON: a string (a quote, then brackets) or objects and arrays (brackets only).
        # Longest first: the one that closes the most wins.
        closing = sorted(range(self.size), key=lambda i: -len(self.token_bytes[i]))
        self.string_closers = np.array([i for i in closing if re.fullmatch(rb'"[]}]*', self.token_bytes[i])], dtype=np.int64)
        self.bracket_closers = np.array([i for i in closing if re.fullmatch(rb"[]}]+", self.token_bytes[i])], dtype=np.int64)
        # When nothing may close yet (a required key or an array's minItems is missing), a comma ends the value in
        # progress (a number that would run on) and moves to the next one.
        self.separators = np.array([i for i in range(self.size) if self.token_bytes[i] == b","], dtype=np.int64)
        # Tokens that would go on with a number's characters (digits, point, exponent): see TokenMatcher.choose.
        self.number_tokens = np.array([bool(b) and b[0] in NUMBER_BYTES for b in self.token_bytes], dtype=bool)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)


class _TokenizerView:
    """What ``llguidance.TokenizerWrapper`` reads: token bytes, special ids, and an encode function."""

    def __init__(self, tokenizer: Tokenizer, end_ids: list[int]):
        self.eos_token_id = end_ids[0] if end_ids else 0
        self.bos_token_id = tokenizer.token_to_id(tokenizer.bos_token) if tokenizer.bos_token else None
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.special_token_ids = sorted(set(tokenizer.special_token_ids()) | set(end_ids))
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text only")  # tells llguidance to pass strings
        return self._tokenizer.encode(text)


_vocabularies: dict[int, ConstraintVocabulary] = {}
_vocabularies_lock = threading.Lock()


def vocabulary_for(tokenizer: Tokenizer, end_token_ids: Iterable[int]) -> ConstraintVocabulary:
    """The (cached) constraint vocabulary of one loaded tokenizer."""
    with _vocabularies_lock:
        vocabulary = _vocabularies.get(id(tokenizer))
        if vocabulary is None or vocabulary.tokenizer is not tokenizer:
            vocabulary = _vocabularies[id(tokenizer)] = ConstraintVocabulary(tokenizer, end_token_ids)
        return vocabulary


# ----------------------------------------------------------------------------- grammars
def _checked(grammar: str, what: str, param: str | None) -> str:
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidRequest(f"{what} cannot be enforced: {error.strip()}", param=param)
    return grammar


def closed_objects(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` wherever an object lists its ``properties`` and says nothing
    about others. Every value valid against the result is valid against ``schema``; the model just cannot invent
    keys (as with OpenAI's strict mode), which is where a small model rambles past ``max_tokens``. Objects under
    ``allOf`` are left open: closing each part would make their combination unsatisfiable."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {}
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas"):
            closed[key] = {k: closed_objects(v) for k, v in value.items()} if isinstance(value, dict) else value
        elif key in ("items", "prefixItems", "anyOf", "oneOf", "additionalProperties", "additionalItems"):
            closed[key] = closed_objects(value)
        else:
            closed[key] = value
    if isinstance(schema.get("properties"), dict) and not ({"additionalProperties", "patternProperties", "allOf",
                                                            "unevaluatedProperties"} & schema.keys()):
        closed["additionalProperties"] = False
    return closed


def json_schema_grammar(schema: dict[str, Any] | None, param: str | None = None) -> str:
    """A grammar for one JSON value valid against ``schema`` (any JSON object when None); objects are closed to the
    keys they list (:func:`closed_objects`).

    Keywords the matcher does not implement are refused (400) with its own words, e.g.
    ``Unimplemented keys: ["not"]``; so is a schema no value can satisfy."""
    schema = {"type": "object"} if schema is None else closed_objects(schema)
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise InvalidRequest(f"the JSON Schema cannot be enforced: {exc}", param=param) from None
    return _checked(grammar, "the JSON Schema", param)


def regex_grammar(pattern: str, param: str | None = None) -> str:
    try:
        grammar = llguidance.LLMatcher.grammar_from_regex(pattern)
    except (ValueError, RuntimeError) as exc:
        raise InvalidRequest(f"the regular expression cannot be enforced: {exc}", param=param) from None
    return _checked(grammar, "the regular expression", param)


def choice_grammar(choices: list[str], param: str | None = None) -> str:
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise InvalidRequest("choices must be a non-empty list of non-empty strings", param=param)
    return lark_grammar("start: " + " | ".join(json.dumps(c) for c in choices), param)


def lark_grammar(text: str, param: str | None = None) -> str:
    try:
        grammar = llguidance.grammar_from("grammar", text)  # Lark, or llama.cpp's GBNF (converted)
    except (ValueError, RuntimeError) as exc:
        raise InvalidRequest(f"the grammar cannot be enforced: {exc}", param=param) from None
    return _checked(grammar, "the grammar", param)


def starts_a_match(vocabulary: ConstraintVocabulary, grammar: str, text: str) -> bool:
    """Whether ``text`` can begin a match of ``grammar`` (a prefill the grammar allows)."""
    matcher = llguidance.LLMatcher(vocabulary.lltokenizer, grammar, log_level=0)
    return matcher.consume_tokens(vocabulary.encode(text)) and not matcher.is_error()


# ----------------------------------------------------------------------------- one completion's matcher
class _JsonScanner:
    """Whether JSON text written so far ends inside a string, and how long the number it ends with is."""

    def __init__(self) -> None:
        self.in_string = False
        self._escaped = False
        self.number_length = 0

    def feed(self, data: bytes) -> None:
        for byte in data:
            if self._escaped:
                self._escaped = False
            elif self.in_string and byte == 0x5C:  # backslash
                self._escaped = True
            elif byte == 0x22:  # quote
                self.in_string = not self.in_string
            if not self.in_string and byte in NUMBER_BYTES:
                self.number_length += 1
            else:
                self.number_length = 0


class TokenMatcher:
    """The grammar state of one completion; used on its engine thread only."""

    def __init__(self, vocabulary: ConstraintVocabulary, constraint: Constraint):
        self.vocabulary = vocabulary
        self._matcher = llguidance.LLMatcher(vocabulary.lltokenizer, constraint.grammar, log_level=0)
        self._allowed: np.ndarray | None = None
        self._json = _JsonScanner() if constraint.json else None
        if constraint.prefix and not self._matcher.consume_tokens(vocabulary.encode(constraint.prefix)):
            raise ValueError(f"the constraint's prefix {constraint.prefix!r} does not match its grammar: {self._matcher.get_error()}")
        if self._json is not None:
            self._json.feed(constraint.prefix.encode())

    @property
    def complete(self) -> bool:
        """Nothing more can follow: the completion ends here."""
        return self._matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        """The text so far is a whole match (an end token is allowed)."""
        return self._matcher.is_accepting()

    @property
    def runaway(self) -> bool:
        """The JSON text ends with a number longer than any a model means to write."""
        return self._json is not None and self._json.number_length >= LONGEST_NUMBER

    @property
    def error(self) -> str:
        return self._matcher.get_error() or ""

    def allowed(self) -> np.ndarray:
        """Which tokens may come next (booleans over the vocabulary); end tokens only when the match is whole."""
        if self._allowed is None:
            bits = np.unpackbits(np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
            allowed = bits[:self.vocabulary.size].astype(bool)
            allowed[self.vocabulary.end_ids] = self._matcher.is_accepting()
            self._allowed = allowed
        return self._allowed

    def allows(self, token_id: int) -> bool:
        return bool(self.allowed()[token_id])

    def accept(self, token_id: int) -> None:
        self._allowed = None
        if not self._matcher.consume_token(token_id):
            raise RuntimeError(f"the grammar refused token {token_id}: {self.error}")
        if self._json is not None:
            self._json.feed(self.vocabulary.token_bytes[token_id])

    def closer(self) -> int | None:
        """The allowed token that closes the most of a JSON value here (the open string, else brackets), or None
        (not JSON, or nothing may close yet: a string's minLength...). Outside strings, when no bracket may close
        (a required key or an array's minItems is missing), a comma moves on to the next value."""
        if self._json is None:
            return None
        allowed = self.allowed()
        vocabulary = self.vocabulary
        groups = (vocabulary.string_closers,) if self._json.in_string else (vocabulary.bracket_closers, vocabulary.separators)
        for candidates in groups:
            hits = candidates[allowed[candidates]]
            if hits.size:
                return int(hits[0])
        return None

    def forced(self) -> list[int]:
        """Tokens the grammar allows and no alternative to, which may be appended without asking the model."""
        return [] if self._matcher.is_stopped() else list(self._matcher.compute_ff_tokens())

    def logprob(self, logits, token_id: int) -> float:
        """The model's log-probability of ``token_id`` in ``logits`` (0.0 without logits: a token the model never saw)."""
        if logits is None:
            return 0.0
        row = np.asarray(logits, dtype=np.float32).reshape(-1)[:self.vocabulary.size]
        peak = float(row.max())
        return float(row[token_id]) - peak - math.log(float(np.exp(row - peak).sum(dtype=np.float64)))

    def choose(self, logits, request: GenerationRequest, rng: np.random.Generator,
               refused: int | None = None) -> tuple[int, float] | None:
        """The allowed token to write instead of the forbidden ``refused`` one, and its log-probability among all
        tokens: the likeliest when the request is greedy, else a draw from the allowed tokens' distribution at the
        request's temperature, top-k and top-p. None when the grammar allows nothing (it failed).

        In JSON, after the digits of a number, a refused token that does not go on with digits (a decimal point in an
        integer, a thousands separator, a word: "2,161,000", "2.1 million") means the model meant the number to end
        there: the number ends (a separator or a closing bracket) when the grammar allows it, rather than growing by
        digits the model never meant, each one another resume."""
        allowed = self.allowed()
        if not allowed.any():
            return None
        if refused is not None and self._json is not None and self._json.number_length and not self._json.in_string:
            first = self.vocabulary.token_bytes[refused][:1]
            if first and first not in b"0123456789":
                ending = allowed & ~self.vocabulary.number_tokens
                if ending.any():
                    allowed = ending
        row = np.asarray(logits, dtype=np.float32).reshape(-1)[:self.vocabulary.size]
        peak = float(row.max())
        log_total = peak + math.log(float(np.exp(row - peak).sum(dtype=np.float64)))
        candidates = np.flatnonzero(allowed)
        scores = row[candidates].astype(np.float64)
        if request.greedy:
            best = int(candidates[int(np.argmax(scores))])
            return best, float(row[best]) - log_total
        scores = scores / max(request.temperature, 1e-5)
        order = np.argsort(-scores, kind="stable")
        if request.top_k > 0:
            order = order[:request.top_k]
        probabilities = np.exp(scores[order] - scores[order[0]])
        probabilities /= probabilities.sum()
        if request.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probabilities), request.top_p)) + 1
            probabilities = probabilities[:keep] / probabilities[:keep].sum()
            order = order[:keep]
        token = int(candidates[order[int(rng.choice(len(order), p=probabilities))]])
        return token, float(row[token]) - log_total
