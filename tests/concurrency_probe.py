"""Run 4 concurrent streaming generations while a ticker measures scheduling gaps.

    python tests/concurrency_probe.py MODEL_DIR gevent|threads

Prints one JSON line: the ticker's largest gap (ms), ticks, and per-stream
delta counts and finish reasons. With ``gevent`` the whole process is
monkey-patched first, as gunicorn's gevent worker does.
"""

import sys

MODE = sys.argv[2]
if MODE == "gevent":
    from gevent import monkey

    monkey.patch_all()

import json  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from llm_blueprint.engine import Model, ModelOptions  # noqa: E402
from llm_blueprint.engine.generation import Engine  # noqa: E402
from llm_blueprint.events import Finish, GenerationRequest, TextDelta  # noqa: E402

model = Model(sys.argv[1], ModelOptions(device="cpu", inter_threads=4, intra_threads=1))
engine = Engine(model)
prompts = ["Tell me a long story about a dragon.", "Explain how rain forms.", "List ten fruits.", "Describe Paris."]
results = [None] * 4
state = {"running": True, "max_gap": 0.0, "ticks": 0}


def ticker():
    last = time.monotonic()
    while state["running"]:
        time.sleep(0.01)
        now = time.monotonic()
        state["max_gap"] = max(state["max_gap"], now - last)
        state["ticks"] += 1
        last = now


def consume(i):
    ids = model.encode_chat([{"role": "user", "content": prompts[i]}])
    deltas, finish = 0, None
    for event in engine.generate(GenerationRequest(ids, max_tokens=64, min_tokens=64, temperature=0)):
        if isinstance(event, TextDelta):
            deltas += 1
        elif isinstance(event, Finish):
            finish = event.reason
    results[i] = {"deltas": deltas, "finish": finish}


tick = threading.Thread(target=ticker)
tick.start()
time.sleep(0.1)
state["max_gap"] = 0.0
workers = [threading.Thread(target=consume, args=(i,)) for i in range(4)]
start = time.monotonic()
for w in workers:
    w.start()
for w in workers:
    w.join()
elapsed = time.monotonic() - start
state["running"] = False
tick.join()
stopped = engine.shutdown()
print(json.dumps({"mode": MODE, "max_gap_ms": state["max_gap"] * 1000, "ticks": state["ticks"],
                  "elapsed_s": elapsed, "results": results, "stopped": stopped}))
