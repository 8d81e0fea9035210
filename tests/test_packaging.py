"""A regular install works: the wheel carries every subpackage, and `llm-blueprint serve` runs from it.

The wheel is built from a copy of the tracked tree and installed with
``--no-deps`` into a fresh virtual environment outside the checkout; a
``.pth`` file there points at this test environment's site-packages for the
dependencies (installing them from the index would take minutes). Paths a
``.pth`` file adds are not scanned for ``.pth`` files themselves, so the
editable install of this checkout stays invisible: the test asserts that
``llm_blueprint`` is imported from the fresh environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import openai
import requests
from servers import ROOT, free_port, serving

COPY_IGNORES = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                      "test-artifacts")


def _run(argv: list, **kwargs) -> str:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _fresh_environment(tmp_path) -> tuple[str, dict[str, str]]:
    """The wheel installed into a new venv whose dependencies come from this environment. Returns its python and env."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=COPY_IGNORES)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, source])
    (wheel,) = wheels.glob("llm_blueprint-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for module in ("chat/pipeline.py", "schemas/openai.py", "api/openai.py", "engine/generation.py", "wsgi.py", "gunicorn_conf.py"):
        assert f"llm_blueprint/{module}" in names, f"the wheel lacks llm_blueprint/{module}"

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = str(venv / "bin" / "python")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel])
    site_packages = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    with open(os.path.join(site_packages, "test-dependencies.pth"), "w") as f:
        f.write("\n".join(sorted(ours)) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PROMETHEUS_MULTIPROC_DIR")}
    return python, env


def test_wheel_installs_and_serves_outside_the_checkout(default_model_dir, tmp_path):
    python, env = _fresh_environment(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([python, "-c", "import llm_blueprint.api, llm_blueprint.chat.pipeline, llm_blueprint.schemas.openai, "
                                "llm_blueprint.wsgi; print(llm_blueprint.__file__)"], env=env, cwd=elsewhere).strip()
    assert where.startswith(str(tmp_path / "venv")), f"imported from {where}, not from the fresh environment"

    port = free_port()
    server_env = {**env, "LLM_MODEL_PATH": default_model_dir, "LLM_MODEL_ID": "smollm2", "PYTHONUNBUFFERED": "1"}
    argv = [os.path.join(os.path.dirname(python), "llm-blueprint"), "serve", "--bind", f"127.0.0.1:{port}"]
    with serving(argv, server_env, port, str(tmp_path / "serve.log"), "/v1/models", str(elsewhere)) as server:
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="smollm2", temperature=0, max_tokens=12,
                                               messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")
        metrics = requests.get(server.base + "/metrics", timeout=10).text  # the shipped gunicorn settings' multiprocess metrics
        assert 'llm_requests_total{route="/v1/chat/completions",status="200"}' in metrics
    assert server.process.returncode == 0, server.log()
