"""The engine's large buffers are served from glibc's heap, not from fresh mmaps (see keep_buffers_in_heap)."""

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")

PROBE = """
import ctypes, json
from llm_blueprint.engine.model import keep_buffers_in_heap

threshold = keep_buffers_in_heap()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(40 * 2**20)  # a key/value buffer of a long batch is of this order

def region(address):
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return fields[5] if len(fields) > 5 else "anonymous mapping"

print(json.dumps({"threshold": threshold, "region": region(block)}))
"""


def probe(**env):
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**environ, **env}, capture_output=True, text=True,
                         check=True, timeout=60)
    return json.loads(out.stdout)


def test_a_large_block_comes_from_the_heap():
    result = probe()
    assert result["threshold"] == 512 * 2**20
    assert result["region"] == "[heap]"


def test_the_users_own_threshold_stands():
    # glibc's default behaviour, kept when the user sets the variable: a 40 MB block is a fresh mapping.
    result = probe(MALLOC_MMAP_THRESHOLD_="131072")
    assert result["threshold"] == 0
    assert result["region"] == "anonymous mapping"
