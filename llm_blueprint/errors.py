"""Error types raised where a problem is found and rendered once per protocol.

The engine and converter raise these; the HTTP layer maps each type to the
envelope and status of the protocol that is answering.
"""

from __future__ import annotations


class LLMBlueprintError(Exception):
    """Base class of every error this package raises on purpose."""


class ModelLoadError(LLMBlueprintError):
    """A model directory is missing something or cannot be loaded."""


class ConversionError(LLMBlueprintError):
    """A GGUF file cannot be converted (unsupported, truncated, unreadable)."""


class InvalidRequest(LLMBlueprintError):
    """A client sent something the server cannot serve.

    ``param`` names the offending field (OpenAI's ``param``), when known.
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ModelNotFound(InvalidRequest):
    """The request names a model this server does not serve."""

    def __init__(self, model: str, served: str, message: str | None = None):
        super().__init__(
            message or f"The model '{model}' does not exist or you do not have access to it. This server serves '{served}'.",
            param="model", code="model_not_found",
        )


class UnknownRoute(InvalidRequest):
    """No API route has this path (a typo such as ``/v1/chat/completion``), or none takes this method on it."""

    def __init__(self, method: str, path: str, allowed: list[str]):
        self.allowed = allowed
        if allowed:
            message = (f"Invalid method for URL ({method} {path}): this route takes {', '.join(allowed)}.")
        else:
            message = f"Invalid URL ({method} {path}): no such API route."
        super().__init__(message, code="method_not_allowed" if allowed else "unknown_url")

    @property
    def status(self) -> int:
        return 405 if self.allowed else 404


def _a(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


class WrongModelKind(InvalidRequest):
    """The request names a served model of another kind than the route serves (an embedding model on a chat route)."""

    def __init__(self, model: str, kind: str, wanted: str, served: list[str]):
        choices = ", ".join(f"'{m}'" for m in served) or "none"
        super().__init__(
            f"The model '{model}' is {_a(kind)} model; this route needs {_a(wanted)} model (served: {choices}).",
            param="model", code="model_not_supported",
        )


class ContextTooLong(InvalidRequest):
    """Prompt plus requested completion do not fit in the model's context."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int, param: str | None = None,
                 model_context: int | None = None):
        # the prompt alone fits: the requested completion is what does not
        param = param or ("max_tokens" if prompt_tokens < context_length else "messages")
        # model_context: the limit is the worker's memory budget (LLM_MEMORY_LIMIT_MB), below the model's own
        limit = (f"This model's maximum context length is {context_length} tokens" if model_context is None else
                 f"This server's memory budget holds at most {context_length} tokens of context for this model "
                 f"(its own maximum is {model_context})")
        message = (
            f"{limit}. However, you "
            f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
            f"{max_tokens} for the completion). Please reduce the prompt or the completion length."
        )
        super().__init__(message, param=param, code="context_length_exceeded")
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_length = context_length


class ChatTemplateError(InvalidRequest):
    """The chat template refused the conversation (``raise_exception``) or is missing."""


class Unauthorized(LLMBlueprintError):
    """Missing or wrong API key (or the host app's auth hook said no)."""

    def __init__(self, message: str = "Invalid API key. Send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'."):
        super().__init__(message)
        self.message = message
        self.code = "invalid_api_key"


class RequestTooLarge(LLMBlueprintError):
    """The request body is larger than the configured limit."""

    def __init__(self, limit: int):
        self.message = f"The request body is larger than the limit of {limit} bytes."
        super().__init__(self.message)


class Overloaded(LLMBlueprintError):
    """The server's queue is full; the client should retry later."""

    def __init__(self, message: str = "The server is overloaded; retry later.", retry_after: int = 1):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class RateLimited(LLMBlueprintError):
    """This API key (or client address) sent more requests than LLM_RATE_LIMIT allows."""

    def __init__(self, limit: str, retry_after: int):
        self.message = f"Rate limit of {limit} per API key exceeded; retry in {retry_after} s."
        self.retry_after = retry_after
        self.code = "rate_limit_exceeded"
        super().__init__(self.message)


class RateLimitUnavailable(LLMBlueprintError):
    """The rate limit could not be checked (its storage failed) and LLM_RATE_LIMIT_FAIL_OPEN is off."""

    def __init__(self, retry_after: int = 1):
        self.message = f"The rate limit cannot be checked right now; retry in {retry_after} s."
        self.retry_after = retry_after
        self.code = "rate_limit_unavailable"
        super().__init__(self.message)


class InvalidModelOutput(LLMBlueprintError):
    """Structured output that cannot be returned: a forced tool call whose arguments max_tokens cut before they closed."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
        self.code = "invalid_model_output"


class GenerationFailed(LLMBlueprintError):
    """The engine failed while generating (a native error); the message says what."""

    def __init__(self, detail: str | None):
        self.message = f"generation failed: {detail}"
        super().__init__(self.message)


class ModelInUse(InvalidRequest):
    """An operator asked to unload a model that is generating (409)."""


class AdminRoutesOff(LLMBlueprintError):
    """The admin routes need LLM_ADMIN_KEYS (403)."""

    def __init__(self):
        self.message = "the admin routes are off on this server (set LLM_ADMIN_KEYS)"
        self.code = "admin_routes_off"
        super().__init__(self.message)


class ModelBusy(LLMBlueprintError):
    """A model cannot load now: the loaded models it would replace are all generating (LLM_MAX_LOADED_MODELS)."""

    def __init__(self, model_id: str, cap: int | None, retry_after: int = 5):
        room = f"{cap} loaded at most" if cap else "no memory for one more"
        self.message = (f"the model {model_id!r} is not loaded and cannot be now: every loaded chat model is generating "
                        f"({room}); retry in {retry_after} s")
        self.retry_after = retry_after
        super().__init__(self.message)


class EngineShutDown(LLMBlueprintError):
    """The engine is stopping or stopped and takes no new work."""


class EngineDead(EngineShutDown):
    """A worker thread of the engine died: no more work until the process restarts (readiness fails)."""

    def __init__(self, failure: str):
        self.message = (f"the model engine stopped after an internal failure ({failure}); this server process takes no "
                        "more generation requests until it is restarted")
        super().__init__(self.message)
