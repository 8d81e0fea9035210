"""llm-blueprint: serve a local LLM from a Flask app over the OpenAI and Anthropic HTTP APIs."""

__version__ = "0.1.0"
