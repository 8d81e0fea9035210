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


BURST = """
import sys
from llm_blueprint.engine import Model, ModelOptions
from llm_blueprint.engine.generation import BatchingOptions, Engine
from llm_blueprint.engine.memory import resident_bytes
from llm_blueprint.engine.model import keep_buffers_in_heap
from llm_blueprint.engine.prompt_cache import release_freed_memory
from llm_blueprint.events import GenerationRequest, collect

keep_buffers_in_heap()
model = Model(sys.argv[1], ModelOptions(device="cpu", inter_threads=2, intra_threads=1))
engine = Engine(model, batching=BatchingOptions(max_batch_size=8, gather_seconds=0.05))
release_freed_memory()
loaded = resident_bytes()
prompt = model.encode_chat([{"role": "user", "content": "Tell me about a cat."}])
streams = [engine.generate(GenerationRequest(prompt, 32, min_tokens=32, temperature=0)) for _ in range(16)]
for stream in streams:
    collect(stream, 1)
assert sorted(engine.batch_sizes) == [8, 8], engine.batch_sizes  # both replicas ran
release_freed_memory()
print((resident_bytes() - loaded) // 2**20)
engine.shutdown()
"""


def test_every_replica_is_ready_when_the_model_is(default_model_dir):
    """What a replica's threads set up on their first call stays for good (about 30 MB a replica on SmolLM2,
    oneDNN): the model warms every replica as it loads, so a first burst over both replicas leaves the worker where
    it was after loading (bench/peer.py's idle-after-load figure). Before: 60 MB more after the burst."""
    done = subprocess.run([sys.executable, "-c", BURST, default_model_dir], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) < 15, done.stdout
