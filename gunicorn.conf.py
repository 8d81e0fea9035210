"""gunicorn settings for serving the model (``gunicorn -c gunicorn.conf.py wsgi:app``).

Choices:
- ``gevent`` worker: each stream is a greenlet; the model runs on native
  threads (see llm_blueprint/engine/handoff.py), so one worker serves many
  streams and the host app's own routes stay responsive.
- one worker by default: every worker loads its own copy of the model
  (about 150 MB for the default int8 model); add workers for more CPU sockets
  or larger machines, not for concurrency.
- ``timeout``: the gevent worker keeps notifying the arbiter while streams
  run, so long generations do not trip it; ``graceful_timeout`` gives
  streams in progress time to finish on SIGTERM.
- never ``preload_app``: the engine's native threads must be created in the
  worker, after the fork.
"""

import os

# OpenMP threads spin-waiting between batches fight the gevent hub for CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

bind = os.environ.get("LLM_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("LLM_WORKERS", "1"))
worker_class = os.environ.get("LLM_WORKER_CLASS", "gevent")
worker_connections = 1000
threads = int(os.environ.get("LLM_GTHREADS", "16"))  # used by the gthread worker only
timeout = 120
graceful_timeout = 60
keepalive = 5
preload_app = False
accesslog = "-"


def worker_exit(server, worker):
    """Stop the engine's native threads before the interpreter exits."""
    app = getattr(getattr(worker, "wsgi", None), "extensions", None)
    runtime = app.get("llm") if isinstance(app, dict) else None
    if runtime is not None:
        runtime.shutdown()
