"""Token-level constraints in the engine: a constrained completion always matches its grammar."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from llm_blueprint.engine import Model, ModelOptions
from llm_blueprint.engine.constraints import choice_grammar, json_schema_grammar, lark_grammar, regex_grammar
from llm_blueprint.engine.generation import Engine
from llm_blueprint.errors import InvalidRequest
from llm_blueprint.events import Constraint, GenerationRequest, collect

CITY = {"type": "object", "additionalProperties": False, "required": ["city", "population", "tags"],
        "properties": {"city": {"type": "string", "maxLength": 20}, "population": {"type": "integer", "minimum": 0},
                       "tags": {"type": "array", "items": {"enum": ["big", "old", "cold"]}, "minItems": 1, "maxItems": 3}}}


@pytest.fixture(scope="module")
def model(default_model_dir):
    return Model(default_model_dir, ModelOptions(device="cpu", inter_threads=1, intra_threads=2))


@pytest.fixture(scope="module")
def engine(model):
    engine = Engine(model)
    yield engine
    assert engine.shutdown()


def _prompt(model, question: str, schema=None) -> list[int]:
    system = "Reply with JSON" + (f" valid against this JSON Schema: {json.dumps(schema)}" if schema else ".")
    return model.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": question}])


def _run(engine, ids, constraint, max_tokens=100, **options):
    texts, finishes, done, _ = collect(engine.generate(GenerationRequest(ids, max_tokens, constraint=constraint, **options)), 1)
    return texts[0], finishes[0], done


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_answers_always_validate(engine, model, temperature):
    grammar = json_schema_grammar(CITY)
    ids = _prompt(model, "Describe Paris.", CITY)
    for _ in range(2):
        text, finish, done = _run(engine, ids, Constraint(grammar), temperature=temperature)
        assert finish.reason == "stop", text
        jsonschema.validate(json.loads(text), CITY)
        assert done.completion_tokens == finish.completion_tokens


def test_a_schema_the_model_would_not_follow_is_followed(engine, model):
    """Unprompted, the model answers in prose; the grammar makes it write the one allowed shape."""
    schema = {"type": "object", "required": ["answer", "confidence"], "additionalProperties": False,
              "properties": {"answer": {"enum": ["yes", "no"]}, "confidence": {"type": "integer", "minimum": 1, "maximum": 5}}}
    ids = model.encode_chat([{"role": "user", "content": "Is the sky blue?"}])
    text, finish, _ = _run(engine, ids, Constraint(json_schema_grammar(schema)), temperature=0)
    assert finish.reason == "stop"
    jsonschema.validate(json.loads(text), schema)
    assert engine.resumes > 0  # the model's own first token ("The"/"Yes") was refused and replaced


def test_prefilled_prefix_is_part_of_the_match(engine, model):
    ids = model.encode_chat([{"role": "user", "content": "Describe Paris as JSON."}]) + model.tokenizer.encode('{"city": "')
    text, finish, _ = _run(engine, ids, Constraint(json_schema_grammar(CITY), prefix='{"city": "'), temperature=0)
    assert finish.reason == "stop"
    jsonschema.validate(json.loads('{"city": "' + text), CITY)


def test_regex_choice_and_lark(engine, model):
    ids = model.encode_chat([{"role": "user", "content": "What is the date of the French national day?"}])
    text, finish, _ = _run(engine, ids, Constraint(regex_grammar(r"\d{4}-\d{2}-\d{2}")), temperature=1.0)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", text) and finish.reason == "stop"
    text, _, _ = _run(engine, ids, Constraint(choice_grammar(["July 14", "May 1", "unknown"])), temperature=1.0)
    assert text in ("July 14", "May 1", "unknown")
    text, _, _ = _run(engine, ids, Constraint(lark_grammar('start: "Day " /[0-9]{1,2}/ " of " MONTH\nMONTH: "July" | "May"')),
                      temperature=0)
    assert re.fullmatch(r"Day [0-9]{1,2} of (July|May)", text)


def test_max_tokens_too_small_ends_with_length_and_a_prefix_of_a_match(engine, model):
    text, finish, done = _run(engine, _prompt(model, "Describe Paris.", CITY), Constraint(json_schema_grammar(CITY)),
                              max_tokens=5, temperature=0)
    assert finish.reason == "length" and done.completion_tokens == 5
    assert text.lstrip().startswith("{")


def _matcher_after(model, schema, text):
    from llm_blueprint.engine.constraints import TokenMatcher, vocabulary_for

    vocabulary = vocabulary_for(model.tokenizer, model.end_token_ids)
    return TokenMatcher(vocabulary, Constraint(json_schema_grammar(schema), prefix=text, json=True)), vocabulary


def test_json_is_written_on_one_line_and_separators_are_forced(model):
    schema = {"type": "object", "required": ["a", "b"], "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}
    matcher, vocabulary = _matcher_after(model, schema, '{"a": 12')
    newline = vocabulary.encode("\n")[-1]
    assert not matcher.allows(newline)  # no pretty-printing: between two values only the separator may follow
    comma = next(i for i in range(vocabulary.size) if vocabulary.token_bytes[i] == b",")
    matcher.accept(comma)
    forced = b"".join(vocabulary.token_bytes[t] for t in matcher.forced())
    assert forced.startswith(b' "b":')  # the next key comes without asking the model


def test_a_refused_separator_after_digits_ends_the_number(model):
    """The model writes "2,161,000" or "2.1 million" in an integer field: the number ends where it wanted punctuation
    (a closing brace here), instead of growing by digits it never meant."""
    import numpy as np

    schema = {"type": "object", "required": ["population"], "properties": {"population": {"type": "integer"}}}
    matcher, vocabulary = _matcher_after(model, schema, '{"population": 2')
    point = next(i for i in range(vocabulary.size) if vocabulary.token_bytes[i] == b".")
    digit = next(i for i in range(vocabulary.size) if vocabulary.token_bytes[i] == b"1")
    logits = np.full(vocabulary.size, -10.0, dtype=np.float32)
    logits[point], logits[digit] = 5.0, 4.0  # the model's next choices: "." (refused), then a digit
    request = GenerationRequest([1], 10, temperature=0)
    rng = np.random.default_rng(0)
    assert not matcher.allows(point)
    chosen, _ = matcher.choose(logits, request, rng, refused=point)
    assert vocabulary.token_bytes[chosen].startswith(b"}")
    assert matcher.choose(logits, request, rng)[0] == digit  # without a refused punctuation: the likeliest allowed


def test_sampled_replacements_are_reproducible_with_a_seed(engine, model):
    ids = model.encode_chat([{"role": "user", "content": "Is the sky blue?"}])
    grammar = json_schema_grammar({"type": "object", "required": ["answer"], "properties": {"answer": {"enum": ["yes", "no"]}}})
    first = _run(engine, ids, Constraint(grammar), temperature=1.0, seed=7)[0]
    assert _run(engine, ids, Constraint(grammar), temperature=1.0, seed=7)[0] == first


def test_only_constrained_batches_copy_the_logits(model):
    calls = []

    class Recording:
        def __init__(self, generator):
            self._generator = generator

        def generate_batch(self, prompts, **options):
            calls.append(options["return_logits_vocab"])
            return self._generator.generate_batch(prompts, **options)

    engine = Engine(model)
    real = model.generator
    model.generator = Recording(real)
    try:
        ids = model.encode_chat([{"role": "user", "content": "Hi"}])
        _run(engine, ids, None, max_tokens=4, temperature=0)
        assert calls == [False]
        _run(engine, ids, Constraint(regex_grammar("[a-z]{3}")), max_tokens=4, temperature=0)
        assert set(calls[1:]) == {True}
    finally:
        model.generator = real
        engine.shutdown()


@pytest.mark.parametrize("schema, words", [
    ({"not": {"type": "string"}}, "not"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "string", "format": "no-such-format"}, "no-such-format"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "Unsatisfiable"),
])
def test_schemas_the_matcher_cannot_enforce_are_refused_by_name(schema, words):
    with pytest.raises(InvalidRequest, match=words):
        json_schema_grammar(schema, param="response_format")


def test_json_values_close_before_the_budget_ends(engine, model):
    """An open-ended value (a long string, a nested object) is closed in the budget's last tokens, not cut."""
    story = {"type": "object", "properties": {"story": {"type": "string"}, "moral": {"type": "string"}}, "required": ["story"]}
    ids = _prompt(model, "Write a very long story about a dragon.", story)
    for temperature in (0.0, 1.0):
        text, finish, done = _run(engine, ids, Constraint(json_schema_grammar(story), json=True), max_tokens=30,
                                  temperature=temperature)
        assert finish.reason == "stop" and done.completion_tokens <= 30, text
        jsonschema.validate(json.loads(text), story)
    text, finish, _ = _run(engine, _prompt(model, "Describe Paris as deeply nested JSON."), Constraint(json_schema_grammar(None), json=True),
                           max_tokens=40, temperature=1.0)
    assert finish.reason == "stop" and isinstance(json.loads(text), dict), text
