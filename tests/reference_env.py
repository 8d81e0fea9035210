"""The upstream tools as a test-only environment: transformers (with torch) and llama.cpp's own GGUF converter.

The project's main environment has neither torch nor transformers, and its own
GGUF writer (``tiny_models.write_gguf``) shares the reader's assumptions. So the
checks that must hold against the world (``test_upstream_files.py``) get their
files from the upstream tools, run in a virtual environment of their own,
made once and cached under ``.test-cache/`` (``LLM_TEST_CACHE`` moves it):

- ``pip install`` of transformers and torch (``REFERENCE_PACKAGES``;
  ``LLM_TEST_REFERENCE_PACKAGES`` replaces the list, for a machine where
  ``torch==2.13.0`` would be a CUDA download rather than the CPU build);
- llama.cpp's ``convert_hf_to_gguf.py``, its ``conversion/`` package and its
  ``gguf-py``, taken from the llama.cpp vendored in the ``llama-cpp-python``
  source distribution (``pip download``; pure Python, nothing is compiled).

Set-up needs the package index, as the README's test command does; the tests
themselves only read the files written here.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("LLM_TEST_CACHE") or os.path.join(ROOT, ".test-cache")
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # vendors llama.cpp with the converter of 2026-11
REFERENCE_PACKAGES = os.environ.get(
    "LLM_TEST_REFERENCE_PACKAGES",
    "torch==2.13.0 transformers==5.25.0 sentencepiece safetensors protobuf jinja2 numpy",
).split()
BUILDER = os.path.join(ROOT, "tests", "reference_build.py")


class ReferenceEnvError(RuntimeError):
    pass


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise ReferenceEnvError(f"{what} failed ({' '.join(command)}):\n{result.stdout[-2000:]}{result.stderr[-4000:]}")


def _spec_key() -> str:
    return hashlib.sha256(json.dumps([LLAMA_CPP_PYTHON, REFERENCE_PACKAGES, sys.version_info[:2]]).encode()).hexdigest()[:12]


def environment() -> tuple[str, str]:
    """(python of the reference environment, path of convert_hf_to_gguf.py), made on first use."""
    home = os.path.join(CACHE, f"reference-{_spec_key()}")
    python = os.path.join(home, "venv", "bin", "python")
    converter = os.path.join(home, "llama.cpp", "convert_hf_to_gguf.py")
    if os.path.exists(os.path.join(home, "ready")):
        return python, converter
    shutil.rmtree(home, ignore_errors=True)
    os.makedirs(home)
    downloads = os.path.join(home, "sdist")
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", downloads,
          LLAMA_CPP_PYTHON], f"downloading {LLAMA_CPP_PYTHON}")
    (archive,) = glob.glob(os.path.join(downloads, "*.tar.gz"))
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    target = os.path.join(home, "llama.cpp")
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            _, _, inner = member.name.partition("/vendor/llama.cpp/")
            if inner and inner.startswith(wanted) and (member.isfile() or member.isdir()):
                member.name = inner
                tar.extract(member, target, filter="data")
    os.remove(archive)
    _run([sys.executable, "-m", "venv", os.path.join(home, "venv")], "making the reference venv")
    _run([python, "-m", "pip", "install", "-q", *REFERENCE_PACKAGES, os.path.join(target, "gguf-py")],
         "installing the reference packages")
    open(os.path.join(home, "ready"), "w").close()
    return python, converter


def build(jobs: list[dict], workdir: str) -> None:
    """Run ``reference_build.py`` on ``jobs`` (each writes into its ``out`` folder), skipping jobs built before
    from the same description, tokenizer files and builder."""
    python, converter = environment()
    stamp = hashlib.sha256(open(BUILDER, "rb").read()).hexdigest()[:12]
    todo = []
    for job in jobs:
        inputs = [open(os.path.join(job["tokenizer"], n), "rb").read() for n in sorted(os.listdir(job["tokenizer"]))]
        stamp_job = [job, stamp, hashlib.sha256(b"".join(inputs)).hexdigest()]
        key = hashlib.sha256(json.dumps(stamp_job, sort_keys=True).encode()).hexdigest()[:12]
        marker = os.path.join(job["out"], f"built-{key}")
        if not os.path.exists(marker):
            todo.append((job, marker))
    if not todo:
        return
    os.makedirs(workdir, exist_ok=True)
    jobs_path = os.path.join(workdir, "jobs.json")
    with open(jobs_path, "w", encoding="utf-8") as f:
        json.dump([job for job, _ in todo], f)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([python, BUILDER, jobs_path, converter], capture_output=True, text=True, env=env)
    if result.returncode:
        raise ReferenceEnvError(f"reference_build.py failed:\n{result.stdout[-2000:]}{result.stderr[-6000:]}")
    for _, marker in todo:
        open(marker, "w").close()
