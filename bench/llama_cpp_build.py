"""llama.cpp's own ``llama-server`` and ``llama-quantize``, built from source once and cached outside the repo.

    python bench/llama_cpp_build.py        # builds (some minutes on 2 cores) or prints the cached binaries

The sources are the ``vendor/llama.cpp`` of the llama-cpp-python sdist from
the package index (the same llama.cpp the llama-cpp-python peer of
bench/throughput.py runs), configured with ``GGML_NATIVE=ON`` so that it uses
every instruction set of this CPU, as a user building it here would.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
TARGETS = ("llama-server", "llama-quantize")


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "llm-blueprint", f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}")


def binaries() -> dict[str, str]:
    """Paths of the built targets, building them first when they are not cached."""
    bin_dir = os.path.join(cache_dir(), "bin")
    paths = {name: os.path.join(bin_dir, name) for name in TARGETS}
    if not all(os.access(path, os.X_OK) for path in paths.values()):
        build(bin_dir)
    return paths


def build(bin_dir: str) -> None:
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"building llama.cpp needs {', '.join(missing)} (Debian: apt-get install cmake g++)")
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama-cpp-build-", dir=cache_dir()) as work:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", work], check=True)
        (sdist,) = glob.glob(os.path.join(work, "llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as archive:
            archive.extractall(work, filter="data")
        (source,) = glob.glob(os.path.join(work, "llama_cpp_python-*", "vendor", "llama.cpp"))
        build_dir = os.path.join(work, "build")
        print(f"building {', '.join(TARGETS)} from {source} (some minutes)", flush=True)
        subprocess.run(["cmake", "-S", source, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                        "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", build_dir, "--config", "Release", "-j", str(min(2, os.cpu_count() or 1)),
                        "--target", *TARGETS], check=True, stdout=subprocess.DEVNULL)
        staging = bin_dir + ".tmp"
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        for name in TARGETS:
            shutil.copy2(os.path.join(build_dir, "bin", name), os.path.join(staging, name))
        shutil.rmtree(bin_dir, ignore_errors=True)
        os.rename(staging, bin_dir)


if __name__ == "__main__":
    for name, path in binaries().items():
        print(f"{name}: {path}")
