"""The HTTP side: one blueprint, one module of routes per protocol."""

from flask import Blueprint

from . import anthropic, openai

bp = Blueprint("llm", __name__)
openai.register(bp)
anthropic.register(bp)

__all__ = ["bp"]
