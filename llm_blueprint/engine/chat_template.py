"""Hugging Face chat templates rendered with Jinja2 in a sandbox.

Templates come from model directories, i.e. from strangers: they run in
Jinja2's immutable sandbox (no attribute games, no file access), with the
variables and helpers Hugging Face's ``apply_chat_template`` provides.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from jinja2 import TemplateError, meta
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ChatTemplateError


class TemplateRaised(Exception):
    """``raise_exception(...)`` called from inside a template."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template plus the special tokens it may reference."""

    def __init__(self, source: str, special_tokens: dict[str, str | None]):
        self.source = source
        self._special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        try:
            env = _environment()
            tree = env.parse(source)
            self._template = env.from_string(tree)
            # Hugging Face's convention: a template that reads `tools` renders tools and tool turns itself.
            self.supports_tools = "tools" in meta.find_undeclared_variables(tree)
        except TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template does not compile: {exc}") from exc

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """Render ``messages`` the way ``tokenizer.apply_chat_template(..., tokenize=False)`` does."""
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                **self._special_tokens,
                **extra,
            )
        except TemplateRaised as exc:
            raise ChatTemplateError(f"the chat template rejected the conversation: {exc}", param="messages") from exc
        except TemplateError as exc:  # includes SecurityError from the sandbox
            raise ChatTemplateError(f"the chat template failed to render: {exc}", param="messages") from exc
        except (TypeError, KeyError, ValueError, AttributeError, IndexError) as exc:
            raise ChatTemplateError(
                f"the chat template failed to render: {exc.__class__.__name__}: {exc}", param="messages"
            ) from exc
