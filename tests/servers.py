"""Start gunicorn the way users do, on a free loopback port, and stop it gracefully."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, process: subprocess.Popen, port: int, log_path: str):
        self.process = process
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log_path

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


@contextmanager
def gunicorn(app: str, env: dict[str, str], log_path: str, ready_path: str, worker_class: str = "gevent", timeout: float = 120,
             check_exit: bool = True):
    port = free_port()
    environ = {**os.environ, **env, "LLM_BIND": f"127.0.0.1:{port}", "LLM_WORKER_CLASS": worker_class, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "gunicorn", "-c", os.path.join(ROOT, "gunicorn.conf.py"), "--chdir", ROOT, app]
    with serving(argv, environ, port, log_path, ready_path, ROOT, timeout) as server:
        yield server
    # after the graceful stop: a worker that crashed at any point (or on its way out) fails the test
    if check_exit:
        crashes = [line for line in server.log().splitlines() if "was sent SIG" in line or "terminate called" in line]
        assert not crashes, f"a gunicorn worker crashed: {crashes}"


@contextmanager
def serving(argv: list[str], env: dict[str, str], port: int, log_path: str, ready_path: str, cwd: str, timeout: float = 120):
    """Run a server listening on ``port`` until ``ready_path`` answers; SIGTERM it (a graceful stop) at the end."""
    log = open(log_path, "w")
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    server = LiveServer(process, port, log_path)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited with {process.returncode}:\n{server.log()}")
            try:
                if requests.get(server.base + ready_path, timeout=2).status_code < 500:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not become ready:\n{server.log()}")
            time.sleep(0.2)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def nginx_in_front(stack: ExitStack, replicas: list[LiveServer], folder: Path, ready_path: str) -> str:
    """Debian's nginx with deploy/nginx.conf.template in front of ``replicas`` (stopped by ``stack``); its base URL
    once ``ready_path`` answers 200 through it."""
    port = free_port()
    with open(os.path.join(ROOT, "deploy", "nginx.conf.template"), encoding="utf-8") as f:
        config = f.read()
    servers = "\n        ".join(f"server 127.0.0.1:{r.port} max_fails=1 fail_timeout=10s;" for r in replicas)
    for key, value in {"run_dir": str(folder), "servers": servers, "listen": f"127.0.0.1:{port}"}.items():
        config = config.replace("{" + key + "}", value)
    (folder / "nginx.conf").write_text(config)
    nginx = subprocess.Popen(["nginx", "-c", str(folder / "nginx.conf"), "-p", str(folder), "-g", "daemon off;"],
                             stdout=subprocess.DEVNULL, stderr=open(folder / "nginx.out", "w"))
    stack.callback(lambda: (nginx.terminate(), nginx.wait(10)))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if requests.get(base + ready_path, timeout=2).status_code == 200:
                return base
        except requests.RequestException:
            pass
        assert nginx.poll() is None, (folder / "nginx.out").read_text()
        assert time.monotonic() < deadline, "nginx did not come up"
        time.sleep(0.2)
