"""A request that names no sampling field gets the model's recommended sampling (generation_config.json), unless a
setting overrides it; the log says which applied."""

from __future__ import annotations

import json
import os

import openai
import pytest

from llm_blueprint.chat_model import API_SAMPLING_DEFAULTS, ChatModel
from llm_blueprint.settings import resolve

QUESTION = [{"role": "user", "content": "Write a short poem about the sea."}]


@pytest.fixture(scope="module")
def greedy_by_default_model(default_model_dir, tmp_path_factory) -> str:
    """The default model with a generation_config.json that recommends greedy decoding and a top_p."""
    folder = tmp_path_factory.mktemp("greedy-model")
    for name in os.listdir(default_model_dir):
        if name != "generation_config.json":
            os.symlink(os.path.join(default_model_dir, name), folder / name)
    with open(os.path.join(default_model_dir, "generation_config.json")) as f:
        config = json.load(f)
    config.pop("repetition_penalty", None)  # left to the API's default, which the test checks is filled in
    (folder / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.0, "top_p": 0.5, "top_k": 7}))
    return str(folder)


def test_the_model_recommendation_applies_when_a_request_names_none(greedy_by_default_model, tmp_path):
    from servers import gunicorn

    env = {"LLM_MODEL_PATH": greedy_by_default_model, "LLM_MODEL_ID": "m", "LLM_EAGER_LOAD": "1"}
    with gunicorn("wsgi:app", env, str(tmp_path / "server.log"), "/v1/models") as server:
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="x", max_retries=0, timeout=120)
        answers = {client.chat.completions.create(model="m", messages=QUESTION, max_tokens=24).choices[0].message.content
                   for _ in range(3)}
        explicit = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=24, temperature=0)
        log = server.log()
    assert answers == {explicit.choices[0].message.content}  # greedy, as the model's config says: no sampling spread
    assert "temperature 0 (model's generation_config.json)" in log and "top_p 0.5 (model's generation_config.json)" in log
    assert "repetition_penalty 1 (API default)" in log


class _Model:
    def __init__(self, sampling):
        self.sampling = sampling


def test_settings_beat_the_model_and_the_api_defaults_fill_the_rest():
    model = ChatModel(resolve({}, {"LLM_DEFAULT_TEMPERATURE": "0.3", "LLM_DEFAULT_TOP_K": "40"}))
    chosen = model._sampling_defaults(_Model({"temperature": 0.9, "top_p": 0.8}))
    assert chosen == {"temperature": 0.3, "top_p": 0.8, "top_k": 40, "repetition_penalty": API_SAMPLING_DEFAULTS["repetition_penalty"]}
    assert ChatModel(resolve({}, {}))._sampling_defaults(_Model({})) == API_SAMPLING_DEFAULTS


def test_the_default_model_ships_its_model_card_sampling(default_model_dir):
    from llm_blueprint.engine.default_model import RECOMMENDED_SAMPLING

    with open(os.path.join(default_model_dir, "generation_config.json")) as f:
        config = json.load(f)
    assert {k: config[k] for k in RECOMMENDED_SAMPLING} == RECOMMENDED_SAMPLING


def test_the_default_models_sampling_applies_to_requests_that_give_none_and_never_overrides_theirs(default_model_dir):
    """Issue #30: the embedded model's answers looped (30 % of 96 everyday answers ran to the budget repeating
    themselves, bench/loop_defaults.py); its defaults now carry repetition_penalty 1.1. A request's own field wins,
    0 included (top_k 0 is "off", not "unset")."""
    from flask import Flask

    from llm_blueprint import LLM
    from llm_blueprint.api.common import request_sampling
    from llm_blueprint.engine.default_model import RECOMMENDED_SAMPLING

    app = Flask("defaults")
    LLM(app, LLM_MODEL_PATH=default_model_dir, LLM_DEFAULT_EMBEDDINGS=False)
    try:
        with app.app_context():
            assert request_sampling({}) == {"top_k": 0, **RECOMMENDED_SAMPLING}
            assert request_sampling({"temperature": None, "repetition_penalty": None}) == {"top_k": 0, **RECOMMENDED_SAMPLING}
            own = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
            assert request_sampling(own) == own
            assert request_sampling({"top_k": 5})["top_k"] == 5
    finally:
        app.extensions["llm"].shutdown()
