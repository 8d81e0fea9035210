"""gunicorn settings for serving the model, shipped in the package so that an installed copy finds them:
``gunicorn -c python:llm_blueprint.gunicorn_conf llm_blueprint.wsgi:app`` (what ``llm-blueprint serve`` runs),
or, from a checkout, ``gunicorn -c gunicorn.conf.py wsgi:app``.

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
- CPU-only hosts: ``OMP_WAIT_POLICY=PASSIVE`` below; each worker's engine measures its
  thread layout over the cores available / ``LLM_WORKERS`` (or ``LLM_CORES``).

docs/deploy.md covers CUDA, systemd, nginx and scaling out.
"""

import os
import shutil
import tempfile

# The model loads when the worker starts (in the background; /readyz turns 200 when it is in), not on the first request.
os.environ.setdefault("LLM_EAGER_LOAD", "1")
# OpenMP threads spin-waiting between batches fight the gevent hub for CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Prometheus metrics from every worker, aggregated on /metrics (prometheus_client multiprocess mode).
# Set before prometheus_client is first imported (it picks its storage then): this module imports
# nothing else of the package, and ``llm_blueprint/__init__.py`` imports the extension only on use.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="llm-blueprint-metrics-"))

bind = os.environ.get("LLM_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("LLM_WORKERS", "1"))
worker_class = os.environ.get("LLM_WORKER_CLASS", "gevent")
worker_connections = 1000
threads = int(os.environ.get("LLM_GTHREADS", "16"))  # used by the gthread worker only
timeout = 120
graceful_timeout = int(os.environ.get("LLM_GRACEFUL_TIMEOUT", "60"))
keepalive = 5
preload_app = False
accesslog = "-"


def on_starting(server):
    """Start with empty metric files (a previous run's values would be counted again)."""
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory, exist_ok=True)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def _runtime(worker):
    app = getattr(worker, "wsgi", None)
    extensions = getattr(app, "extensions", None)
    return extensions.get("llm") if isinstance(extensions, dict) else None


def post_worker_init(worker):
    """On SIGTERM, refuse new API requests and give running streams until shortly
    before graceful_timeout to finish; then they end with proper final events."""
    import signal

    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(sig, frame):
        runtime = _runtime(worker)
        if runtime is not None:
            runtime.start_draining(max(1.0, worker.cfg.graceful_timeout - 5))
        if callable(previous):
            previous(sig, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def worker_exit(server, worker):
    """Stop the engine's native threads before the interpreter exits (or end the process at once when a native call
    still runs: Runtime.end_process_if_busy)."""
    runtime = _runtime(worker)
    if runtime is not None:
        runtime.end_process_if_busy()
