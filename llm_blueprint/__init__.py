"""llm-blueprint: serve a local LLM from a Flask app over the OpenAI and Anthropic HTTP APIs."""

from .extension import LLM

__version__ = "0.1.0"
__all__ = ["LLM"]
