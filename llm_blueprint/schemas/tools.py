"""Tool lists in which some kinds of tool cannot run here.

Agent clients send, beside the functions they run themselves, tools that run on
the provider's servers (OpenAI's ``web_search``, ``file_search``,
``code_interpreter``, ``image_generation``, ``mcp``...; Anthropic's server tools
and its built-in client tools such as ``bash_…``, which come without a
schema). This server can run none of them. :class:`ToolList` loads the tools it
can serve and sets the others aside by type; the route then leaves them out of
what the model sees, or refuses the request (``LLM_UNSUPPORTED_TOOLS``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from marshmallow import Schema, ValidationError, fields


class ToolDefinitions(list):
    """The tools the model will see, plus ``unsupported``: the types of those set aside, in request order."""

    def __init__(self, tools=(), unsupported=()):
        super().__init__(tools)
        self.unsupported = list(unsupported)


class ToolList(fields.Field):
    """A list of tool objects. ``serves(tool)`` tells whether this server can run a tool (else its ``type`` is set
    aside); ``expand(tool)`` may turn one entry into several (Codex's namespaces), each loaded with ``schema``."""

    openapi = {"type": "array", "items": {"type": "object"}, "nullable": True}

    def __init__(self, schema: Schema, serves: Callable[[dict[str, Any]], bool],
                 expand: Callable[[dict[str, Any]], list[dict[str, Any]] | None] | None = None, **kwargs):
        super().__init__(allow_none=True, **kwargs)
        self.schema = schema
        self.serves = serves
        self.expand = expand

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, list):
            raise ValidationError("must be a list of tool objects")
        tools, unsupported, errors = [], [], {}
        for i, tool in enumerate(value):
            if not isinstance(tool, dict):
                errors[i] = ["must be an object"]
                continue
            expanded = self.expand(tool) if self.expand else None
            for part in (expanded if expanded is not None else [tool]):
                if not self.serves(part):
                    kind = part.get("type")
                    unsupported.append(kind if isinstance(kind, str) and kind else "unknown")
                    continue
                try:
                    tools.append(self.schema.load(part))
                except ValidationError as exc:
                    errors[i] = exc.messages
        if errors:
            raise ValidationError(errors)
        return ToolDefinitions(tools, unsupported)
