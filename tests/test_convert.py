"""GGUF → CTranslate2 conversion is exact, and broken inputs fail cleanly."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from reference_forward import reference_logits

from llm_blueprint.convert import convert_gguf
from llm_blueprint.errors import ConversionError


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_float32_conversion_reproduces_reference_forward_pass(name, request, passage):
    model = request.getfixturevalue(f"{name}_f32")
    gguf_path = request.getfixturevalue(f"{name}_gguf")
    ids = model.encode_prompt(passage)
    assert len(ids) > 250
    logits = np.asarray(model.generator.forward_batch([ids]))[0]
    expected = reference_logits(gguf_path, ids)
    assert logits.shape == expected.shape
    assert np.abs(logits - expected).max() < 1e-3


def test_smollm2_float32_greedy_follows_its_own_logits(smollm2_f32):
    # What the model answers differs by CPU (float GEMMs round differently); what must hold on any machine is that
    # greedy generation picks the argmax of the model's own teacher-forced next-token logits wherever the choice is clear.
    ids = smollm2_f32.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    result = smollm2_f32.generator.generate_batch(
        [smollm2_f32.tokenizer.ids_to_tokens(ids)], max_length=40, include_prompt_in_result=False,
        end_token=smollm2_f32.end_tokens,
    )
    generated = result[0].sequences_ids[0]
    assert generated
    logits = np.asarray(smollm2_f32.generator.forward_batch([ids + generated]))[0]
    clear = 0
    for i, token in enumerate(generated):
        row = logits[len(ids) - 1 + i]
        second, first = np.sort(row)[-2:]
        if first - second > 1e-2:
            clear += 1
            assert int(np.argmax(row)) == token, i
    assert clear >= len(generated) // 2


def test_converted_directory_has_the_standard_layout(smollm2_f32_dir, gemma3_f32_dir):
    common = {"model.bin", "config.json", "vocabulary.json", "tokenizer_config.json", "generation_config.json"}
    assert common | {"tokenizer.json"} <= set(os.listdir(smollm2_f32_dir))
    assert common | {"tokenizer.model"} <= set(os.listdir(gemma3_f32_dir))


def _assert_nothing_left(parent: str, name: str):
    leftovers = [entry for entry in os.listdir(parent) if name in entry]
    assert leftovers == []


def test_unsupported_architecture_fails_up_front(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConversionError, match="unsupported architecture 'gpt2'"):
        convert_gguf(path, tmp_path / "out", show_progress=False)
    _assert_nothing_left(str(tmp_path), "out")


def test_truncated_gguf_fails_and_leaves_nothing(tmp_path, smollm2_gguf):
    path = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(30 * 1024 * 1024))
    with pytest.raises(ConversionError, match="truncated"):
        convert_gguf(path, tmp_path / "out", show_progress=False)
    _assert_nothing_left(str(tmp_path), "out")


def test_gguf_cut_inside_its_header_fails_clearly(tmp_path, smollm2_gguf):
    path = tmp_path / "head.gguf"
    with open(smollm2_gguf, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(4096))
    with pytest.raises(ConversionError, match="cannot read GGUF file"):
        convert_gguf(path, tmp_path / "out", show_progress=False)
    _assert_nothing_left(str(tmp_path), "out")


def test_existing_output_is_not_overwritten_without_force(tmp_path, smollm2_gguf):
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        convert_gguf(smollm2_gguf, out, show_progress=False)


def test_console_script_converts(tmp_path, smollm2_gguf):
    out = tmp_path / "cli-out"
    proc = subprocess.run(
        [sys.executable, "-m", "llm_blueprint.cli", "convert", smollm2_gguf, str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.bin").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "llm_blueprint.cli", "convert", str(tmp_path / "missing.gguf"), str(tmp_path / "x")],
        capture_output=True, text=True, timeout=60,
    )
    assert bad.returncode == 2 and "GGUF file not found" in bad.stderr
