"""Debian packages some tests drive (Chromium, nginx), installed by the test set-up when missing."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from filelock import FileLock


def ensure_debian_packages(*needs: tuple[str, str]) -> None:
    """Install each ``(binary, package)`` whose binary is not on PATH (apt-get, as root)."""
    missing = [package for binary, package in needs if not shutil.which(binary)]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail(f"these tests need the Debian packages {missing}: run `apt-get install {' '.join(missing)}` as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with FileLock("/tmp/llm-blueprint-apt.lock"):
        missing = [package for binary, package in needs if not shutil.which(binary)]
        if missing:
            subprocess.run(["apt-get", "update", "-q"], check=True, env=env, capture_output=True)
            subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], check=True, env=env,
                           capture_output=True)
