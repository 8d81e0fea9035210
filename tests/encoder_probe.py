"""Run concurrent embedding requests on greenlets while a ticker greenlet measures scheduling gaps.

    python tests/encoder_probe.py ENCODER_DIR

Prints one JSON line: the ticker's largest gap (s), the longest forward pass (s), forward passes, requests done.
The whole process is monkey-patched first, as gunicorn's gevent worker does.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

from llm_blueprint.engine.encoder import EncoderEngine, EncoderModel, EncoderOptions  # noqa: E402

model = EncoderModel(sys.argv[1], EncoderOptions(device="cpu", compute_type="float32", intra_threads=2))
engine = EncoderEngine(model, EncoderOptions(max_batch_size=64, max_batch_tokens=1 << 20))
forward, longest = model.forward, [0.0]


def timed(batch):
    started = time.monotonic()
    try:
        return forward(batch)
    finally:
        longest[0] = max(longest[0], time.monotonic() - started)


model.forward = timed
text = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)
state = {"running": True, "max_gap": 0.0, "done": 0}


def ticker():
    last = time.monotonic()
    while state["running"]:
        gevent.sleep(0.01)
        now = time.monotonic()
        state["max_gap"] = max(state["max_gap"], now - last)
        last = now


def client():
    for _ in range(3):
        engine.embed(model.encode_texts([text] * 16, -1, "input"))
        state["done"] += 1


tick = gevent.spawn(ticker)
gevent.joinall([gevent.spawn(client) for _ in range(6)])
state["running"] = False
tick.join()
print(json.dumps({"max_gap": state["max_gap"], "longest_forward": longest[0], "forwards": len(engine.batch_sizes),
                  "done": state["done"]}))
engine.shutdown()
