"""Field types and helpers shared by every protocol's schemas."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields

from ..errors import InvalidRequest


class StrictFloat(fields.Float):
    """A JSON number (ints allowed), never a string or a boolean."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValidationError("must be a number")
        return super()._deserialize(value, attr, data, **kwargs)


class StrictInt(fields.Integer):
    def __init__(self, **kwargs):
        super().__init__(strict=True, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool):
            raise ValidationError("must be an integer")
        return super()._deserialize(value, attr, data, **kwargs)


class StrictBool(fields.Boolean):
    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise ValidationError("must be a boolean")
        return value


class StrictStr(fields.String):
    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, str):
            raise ValidationError("must be a string")
        return value


class StringOrList(fields.Field):
    """A string or a list of strings (``stop``), normalized to a list."""

    openapi = {"nullable": True, "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}

    def __init__(self, max_items: int, **kwargs):
        super().__init__(**kwargs)
        self.max_items = max_items

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            if len(value) > self.max_items:
                raise ValidationError(f"at most {self.max_items} items are allowed")
            return value
        raise ValidationError("must be a string or a list of strings")


def join_text_parts(value: Any, *, text_types: frozenset[str], unsupported: Callable[[str], str],
                    ignored: frozenset[str] = frozenset(), refusal: bool = False, separator: str = "") -> str:
    """A list of content parts/blocks joined into one string (the model reads text only).

    Errors are keyed by part index, so the failing field's path reaches the client.
    """
    if not isinstance(value, list):
        raise ValidationError("must be a string or a list of content parts")
    texts = []
    for i, part in enumerate(value):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise ValidationError({i: ["each content part must be an object with a 'type'"]})
        kind = part["type"]
        if kind in text_types:
            if not isinstance(part.get("text"), str):
                raise ValidationError({i: {"text": ["must be a string"]}})
            texts.append(part["text"])
        elif refusal and kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        elif kind not in ignored:
            raise ValidationError({i: {"type": [unsupported(kind)]}})
    return separator.join(texts)


class RequestSchema(Schema):
    """Unknown fields are ignored, as the public APIs' clients expect."""

    class Meta:
        unknown = EXCLUDE


def first_error(messages: Any, path: str = "") -> tuple[str, str]:
    """The first (param path, message) of marshmallow's nested error dict."""
    if isinstance(messages, dict):
        key, value = next(iter(messages.items()))
        if key == "_schema":
            return first_error(value, path)
        step = f"[{key}]" if isinstance(key, int) else (f".{key}" if path else str(key))
        return first_error(value, path + step)
    if isinstance(messages, list) and messages:
        if isinstance(messages[0], (dict, list)):
            return first_error(messages[0], path)
        return path, str(messages[0])
    return path, str(messages)


def load(schema: Schema, body: Any) -> dict[str, Any]:
    """Validate ``body``; any problem becomes an :class:`InvalidRequest` naming the field."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", param=None)
    try:
        return schema.load(body)
    except ValidationError as exc:
        param, message = first_error(exc.messages)
        if message == "Missing data for required field." and param:
            raise InvalidRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter") from None
        raise InvalidRequest(f"Invalid value for '{param}': {message}" if param else message, param=param or None) from None
