"""marshmallow schemas for the Anthropic Messages API request bodies."""

from __future__ import annotations

import re
from typing import Any

from marshmallow import ValidationError, fields, validate, validates_schema

from .common import RequestSchema, StrictBool, StrictFloat, StrictInt, StrictStr, join_text_parts
from .tools import ToolList

UNSERVABLE_BLOCKS = {
    "image": "image blocks are not supported: this model reads text only",
    "document": "document blocks are not supported: this model reads text only",
    "search_result": "search_result blocks are not supported by this server",
}
# Blocks a client replays from earlier turns that carry nothing the prompt needs.
IGNORED_BLOCKS = {"thinking", "redacted_thinking"}


class SystemText(str):
    """The system prompt's text; ``cached``: one of its blocks carries a cache breakpoint."""

    cached = False


def _cache_control(value: Any, where: Any) -> dict[str, Any] | None:
    """A checked ``cache_control`` (``{"type": "ephemeral", "ttl": "5m" | "1h"}``), or None."""
    if value is None:
        return None
    errors = CacheControlSchema().validate(value) if isinstance(value, dict) else {"_schema": ["must be an object"]}
    if errors:
        raise ValidationError({where: {"cache_control": errors}} if where is not None else {"cache_control": errors})
    return value


def _unservable(kind: str) -> str:
    return UNSERVABLE_BLOCKS.get(kind, f"content block type '{kind}' is not supported")


def _text_blocks(value, what: str) -> str:
    if isinstance(value, str):
        return value
    return join_text_parts(value, text_types=frozenset({"text"}), ignored=frozenset(IGNORED_BLOCKS), unsupported=_unservable,
                           separator="\n\n" if what == "system" else "")


def _block(i: int, block: Any) -> dict[str, Any] | None:
    """One content block, checked and normalized (None for blocks the prompt does not need)."""
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise ValidationError({i: ["each content block must be an object with a 'type'"]})
    kind = block["type"]
    cache = _cache_control(block.get("cache_control"), i)
    normalized = _normalized_block(i, block, kind)
    if normalized is not None and cache:
        normalized["cache_control"] = cache
    return normalized


def _normalized_block(i: int, block: dict[str, Any], kind: str) -> dict[str, Any] | None:
    if kind == "text":
        return {"type": "text", "text": _text_blocks([block], "content")}
    if kind in IGNORED_BLOCKS:
        return None
    if kind == "tool_use":
        if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
            raise ValidationError({i: ["a tool_use block needs a string 'id' and 'name'"]})
        if not isinstance(block.get("input"), dict):
            raise ValidationError({i: {"input": ["must be an object"]}})
        return {"type": "tool_use", "id": block["id"], "name": block["name"], "input": block["input"]}
    if kind == "tool_result":
        if not isinstance(block.get("tool_use_id"), str):
            raise ValidationError({i: {"tool_use_id": ["is required (the id of the tool_use block this answers)"]}})
        content = block.get("content", "")
        try:
            text = content if isinstance(content, str) else _text_blocks(content, "content")
        except ValidationError as exc:
            raise ValidationError({i: {"content": exc.messages}}) from None
        is_error = block.get("is_error", False)
        if not isinstance(is_error, bool):
            raise ValidationError({i: {"is_error": ["must be a boolean"]}})
        return {"type": "tool_result", "tool_use_id": block["tool_use_id"], "content": text, "is_error": is_error}
    raise ValidationError({i: {"type": [_unservable(kind)]}})


def _content_blocks(value) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if not isinstance(value, list):
        raise ValidationError("must be a string or a list of content blocks")
    return [b for b in (_block(i, block) for i, block in enumerate(value)) if b is not None]


_BLOCKS = {"type": "array", "items": {"type": "object", "required": ["type"],
                                     "properties": {"type": {"type": "string"}, "text": {"type": "string"}}}}


class MessageContent(fields.Field):
    """A string or blocks (text, tool_use, tool_result; thinking ignored), normalized to a list of blocks."""

    openapi = {"oneOf": [{"type": "string"}, _BLOCKS]}

    def _deserialize(self, value, attr, data, **kwargs):
        return _content_blocks(value)


# Claude Code's first system line: "x-anthropic-billing-header: cc_version=...; cc_entrypoint=cli; cch=<nonce>;". The
# nonce changes with every request, so left in it would make every prompt new from its first tokens on and the prompt
# cache useless (llama.cpp#20623, vllm-mlx#277 drop it too); it says nothing to the model.
BILLING_HEADER = re.compile(r"^x-anthropic-billing-header:[^\n]*(\n|$)", re.MULTILINE)


def without_billing_header(text: str) -> str:
    return BILLING_HEADER.sub("", text).lstrip("\n") if "x-anthropic-billing-header:" in text else text


class SystemPrompt(fields.Field):
    openapi = {"nullable": True, "oneOf": [{"type": "string"}, _BLOCKS]}

    def _deserialize(self, value, attr, data, **kwargs):
        text = SystemText(without_billing_header(_text_blocks(value, "system")))
        if isinstance(value, list):
            text.cached = any(_cache_control(b.get("cache_control"), i) for i, b in enumerate(value) if isinstance(b, dict))
        return text


def _valid_role(role: str) -> None:
    # "system" entries among the messages: Claude Code (2.1.154 and later) sends them; see api/anthropic.py _history
    if role not in ("user", "assistant", "system"):
        raise ValidationError(f"role must be 'user', 'assistant' or 'system', not {role!r}")


class MessageSchema(RequestSchema):
    role = StrictStr(required=True, validate=_valid_role)
    content = MessageContent(required=True)


class CacheControlSchema(RequestSchema):
    type = StrictStr(required=True, validate=validate.OneOf(["ephemeral"]))
    ttl = StrictStr(allow_none=True, validate=validate.OneOf(["5m", "1h"]))


class AnthropicToolSchema(RequestSchema):
    name = StrictStr(required=True)
    cache_control = fields.Nested(CacheControlSchema, allow_none=True)
    description = StrictStr(allow_none=True)
    input_schema = fields.Dict()
    type = StrictStr(allow_none=True)

    @validates_schema
    def _client_tool(self, data, **kwargs):
        if "input_schema" not in data:
            raise ValidationError("is required", field_name="input_schema")


class ToolChoiceSchema(RequestSchema):
    type = StrictStr(required=True, validate=validate.OneOf(["auto", "any", "none", "tool"]))
    name = StrictStr()
    disable_parallel_tool_use = StrictBool(allow_none=True)

    @validates_schema
    def _named(self, data, **kwargs):
        if data["type"] == "tool" and not data.get("name"):
            raise ValidationError("is required when type is 'tool'", field_name="name")


class ThinkingSchema(RequestSchema):
    type = StrictStr(required=True, validate=validate.OneOf(["enabled", "disabled", "adaptive"]))
    budget_tokens = StrictInt(validate=validate.Range(1))


class OutputFormatSchema(RequestSchema):
    type = StrictStr(required=True, validate=validate.OneOf(["json_schema"]))
    schema = fields.Dict(required=True)


class OutputConfigSchema(RequestSchema):
    # effort: accepted; a local model has one way to answer (documented in the README).
    effort = StrictStr(allow_none=True, validate=validate.OneOf(["low", "medium", "high", "xhigh", "max"]))
    format = fields.Nested(OutputFormatSchema, allow_none=True)


class CountTokensRequestSchema(RequestSchema):
    model = StrictStr(required=True)
    messages = fields.List(fields.Nested(MessageSchema), required=True, validate=validate.Length(min=1))
    system = SystemPrompt(allow_none=True)
    # Server tools (web_search_…, code_execution_…) and Anthropic's schema-less client tools (bash_…): set aside
    tools = ToolList(AnthropicToolSchema(), serves=lambda tool: tool.get("type") in (None, "custom"))
    tool_choice = fields.Nested(ToolChoiceSchema, allow_none=True)
    thinking = fields.Nested(ThinkingSchema, allow_none=True)
    output_config = fields.Nested(OutputConfigSchema, allow_none=True)
    cache_control = fields.Nested(CacheControlSchema, allow_none=True)  # automatic caching (the last block)


class MessagesRequestSchema(CountTokensRequestSchema):
    max_tokens = StrictInt(required=True, validate=validate.Range(1))
    stop_sequences = fields.List(StrictStr(), allow_none=True)
    temperature = StrictFloat(allow_none=True, validate=validate.Range(0, 1))
    top_p = StrictFloat(allow_none=True, validate=validate.Range(0, 1, min_inclusive=False))
    top_k = StrictInt(allow_none=True, validate=validate.Range(0))
    metadata = fields.Dict(allow_none=True)
    stream = StrictBool(allow_none=True)
