"""OpenAI's published OpenAPI document (``openai/openai-openapi``, MIT) as JSON Schema 2020-12 validators.

The document is OpenAPI 3.1 but still marks 112 schemas OpenAPI-3.0-style with ``nullable: true``; at load each
of those becomes ``anyOf: [<the schema>, {"type": "null"}]``. Where the document is stricter than the live API is
known to be, :data:`LIVE_API_DEVIATIONS` patches that one property, with the reason.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import os
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "openai-openapi.json.gz")
URI = "urn:openai-openapi"
NULL = {"type": "null"}


def _nullable_as_null(node: Any) -> Any:
    if isinstance(node, list):
        return [_nullable_as_null(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable_as_null(v) for k, v in node.items()}
    if node.pop("nullable", False) is True:
        return {"anyOf": [node, NULL]}
    return node


def _allow_null(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, NULL]}


_LEGACY_LOGPROBS = ("properties", "choices", "items", "properties", "logprobs", "anyOf", 0, "properties")

# (component, path of keys inside it, how to change that node, why the live API differs from the document)
LIVE_API_DEVIATIONS: list[tuple[str, tuple[str, ...], Any, str]] = [
    ("Response", ("allOf", 2, "properties", "usage"), _allow_null,
     "`response.created`/`response.in_progress` (and `response.failed`) carry the Response with `usage: null`: "
     "the API sends it so, and the openai SDK's own Response type has `usage: Optional[ResponseUsage]`; the tests "
     "assert that a completed or incomplete Response has usage"),
    ("CreateCompletionResponse", _LEGACY_LOGPROBS + ("token_logprobs", "items"), _allow_null,
     "with `echo`, the prompt's first token is listed with a null logprob (nothing before it to score it by): "
     "the API's own documented behaviour, which the document's `number` items cannot express"),
    ("CreateCompletionResponse", _LEGACY_LOGPROBS + ("top_logprobs", "items"), _allow_null,
     "likewise the first echoed token's top_logprobs entry is null"),
    ("Embedding", ("properties", "embedding"), lambda schema: {"anyOf": [schema, {"type": "string"}]},
     "with `encoding_format: base64` the API sends each vector as base64 text of little-endian float32 (the openai "
     "SDK asks for it by default and decodes it); the document describes the float array only"),
]

# Schemas the document lacks, derived from one of its own: (base, [(path, change, why), ...]).
DERIVED: dict[str, tuple[str, list[tuple[tuple[str, ...], Any, str]]]] = {
    # The document says "both the streamed and non-streamed response objects share the same shape" for legacy
    # completions, but the stream differs from the body in two documented ways.
    "x-CompletionStreamChunk": ("CreateCompletionResponse", [
        (("properties", "choices", "items", "properties", "finish_reason"), _allow_null,
         "a streamed choice carries finish_reason: null until its last chunk (as the API sends it)"),
        (("properties", "usage"), _allow_null,
         "with stream_options.include_usage 'all other chunks will also include a usage field, but with a null "
         "value' (ChatCompletionStreamOptions' own description, which the completions route shares)"),
    ]),
}


def _patch(schema: dict[str, Any], path: tuple[Any, ...], change) -> None:
    node = schema
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = change(node[path[-1]])


@functools.lru_cache(maxsize=1)
def document() -> dict[str, Any]:
    with gzip.open(PATH, "rt", encoding="utf-8") as f:
        doc = _nullable_as_null(json.load(f))
    schemas = doc["components"]["schemas"]
    for name, path, change, _why in LIVE_API_DEVIATIONS:
        _patch(schemas[name], path, change)
    for name, (base, patches) in DERIVED.items():
        schemas[name] = copy.deepcopy(schemas[base])
        for path, change, _why in patches:
            _patch(schemas[name], path, change)
    return doc


@functools.cache
def validator(component: str) -> Draft202012Validator:
    """A validator for ``#/components/schemas/<component>`` with every ``$ref`` resolved inside the document."""
    registry = Registry().with_resource(URI, Resource.from_contents(document(), default_specification=DRAFT202012))
    return Draft202012Validator({"$ref": f"{URI}#/components/schemas/{component}"}, registry=registry)


def errors(body: Any, component: str) -> list[str]:
    """Every way ``body`` breaks the component's schema (best match first), as readable lines."""
    found = sorted(validator(component).iter_errors(body), key=lambda e: e.path)
    lines = []
    for error in found:
        causes = error.context and sorted(error.context, key=lambda e: -len(e.absolute_path))[:3] or []
        detail = "; ".join(f"{'/'.join(map(str, c.absolute_path))}: {c.message[:200]}" for c in causes)
        lines.append(f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message[:300]}"
                     + (f" [{detail}]" if detail else ""))
    return lines


def check(body: Any, component: str) -> None:
    problems = errors(body, component)
    assert not problems, f"{component}:\n" + "\n".join(problems) + "\n" + json.dumps(body)[:2000]


@functools.lru_cache(maxsize=1)
def stream_event_schemas() -> dict[str, str]:
    """``ResponseStreamEvent``'s members by their ``type`` (validating one member gives readable errors; the union
    is an ``anyOf`` of 57)."""
    members = {}
    schemas = document()["components"]["schemas"]
    for ref in schemas["ResponseStreamEvent"]["anyOf"]:
        name = ref["$ref"].rsplit("/", 1)[-1]
        kind = schemas[name]["properties"]["type"]
        kind = kind.get("enum") or [kind.get("const")]
        members[kind[0]] = name
    return members
