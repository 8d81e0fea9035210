"""``/tokenize`` and ``/detokenize``: how many tokens a prompt costs, raw or as the chat template renders it.

Apps use them to budget the context (llama.cpp and vLLM serve them). The chat form renders exactly what
``/v1/chat/completions`` would, so its count equals that route's ``usage.prompt_tokens``.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from ..chat.prompt import render
from ..errors import InvalidRequest
from ..schemas.common import load
from ..schemas.response_bodies import DetokenizeResult, TokenizeResult
from ..schemas.tokenize import DetokenizeRequestSchema, TokenizeRequestSchema
from .common import check_limits, check_model, json_body, json_response, served
from .errors import error_envelope
from .openai import _chat_request as chat_completion_request  # the chat completion's own request, hence its own prompt
from .openapi import OPENAI_ERRORS, documented

TOKENIZE_SCHEMA = TokenizeRequestSchema()
DETOKENIZE_SCHEMA = DetokenizeRequestSchema()


def _served_model(data: dict[str, Any]) -> None:
    if data.get("model") is not None:
        check_model(data["model"])


@error_envelope("openai")
@documented("tokenize", TokenizeResult, body=TokenizeRequestSchema, errors=OPENAI_ERRORS)
def tokenize():
    data = load(TOKENIZE_SCHEMA, json_body())
    _served_model(data)
    model = served().model
    if data.get("messages") is not None:
        check_limits(len(data["messages"]), tools=len(data.get("tools") or []))
        ids = render(model, chat_completion_request(data)).ids
    elif data.get("add_special_tokens") is False:
        ids = model.encode_text(data["prompt"], "prompt")
    else:
        ids = model.encode_prompt(data["prompt"])  # as /v1/completions encodes it
    body: dict[str, Any] = {"count": len(ids), "max_model_len": served().context_limit, "tokens": ids}
    if data.get("return_token_strs"):
        body["token_strs"] = model.tokenizer.ids_to_tokens(ids)
    return json_response(body)


@error_envelope("openai")
@documented("detokenize", DetokenizeResult, body=DetokenizeRequestSchema, errors=OPENAI_ERRORS)
def detokenize():
    data = load(DETOKENIZE_SCHEMA, json_body())
    _served_model(data)
    tokenizer = served().model.tokenizer
    if any(t >= tokenizer.vocab_size for t in data["tokens"]):
        raise InvalidRequest(f"token ids must be between 0 and {tokenizer.vocab_size - 1}", param="tokens")
    return json_response({"prompt": tokenizer.decode(data["tokens"])})


def register(bp: Blueprint) -> None:
    bp.add_url_rule("/tokenize", "tokenize", tokenize, methods=["POST"])
    bp.add_url_rule("/detokenize", "detokenize", detokenize, methods=["POST"])
