"""The model side: loading, tokenizers, chat templates, generation. Knows nothing of HTTP."""

from .model import EngineOptions, Model, ModelOptions

__all__ = ["EngineOptions", "Model", "ModelOptions"]
