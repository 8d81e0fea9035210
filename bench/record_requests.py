"""A loopback recorder between a client program and a server: how the request bodies in tests/data were captured.

    python bench/record_requests.py --upstream http://127.0.0.1:8000 --port 9000 --out DIR

Every request is forwarded to ``--upstream`` and its answer streamed back unchanged (SSE included); each request's
method, path, the headers a protocol reads and its JSON body are written to ``DIR/NNN.json`` (in arrival order).
Point the client at ``http://127.0.0.1:PORT``. Stop with Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

KEPT_HEADERS = ("content-type", "accept", "anthropic-version", "anthropic-beta", "openai-beta", "user-agent", "originator",
                "x-stainless-lang", "x-stainless-package-version", "x-stainless-runtime")


def handler(upstream: str, out: str):
    counter = {"n": 0}
    lock = threading.Lock()

    class Recorder(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            with lock:
                counter["n"] += 1
                number = counter["n"]
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode("utf-8", "replace")
            record = {"method": self.command, "path": self.path, "body": body,
                      "headers": {k: v for k, v in self.headers.items() if k.lower() in KEPT_HEADERS}}
            with open(os.path.join(out, f"{number:03d}.json"), "w", encoding="utf-8") as f:
                json.dump(record, f, indent=1, ensure_ascii=False)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "accept-encoding")}
            reply = requests.request(self.command, upstream + self.path, data=raw, headers=headers, stream=True, timeout=3600)
            self.send_response(reply.status_code)
            for key, value in reply.headers.items():
                if key.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                    self.send_header(key, value)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for chunk in reply.iter_content(chunk_size=None):
                if chunk:
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")

        do_GET = do_POST = do_DELETE = _forward

        def log_message(self, fmt: str, *args) -> None:  # one line per request
            print(f"{self.command} {self.path} -> {args[1] if len(args) > 1 else ''}", flush=True)

    return Recorder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    ThreadingHTTPServer(("127.0.0.1", args.port), handler(args.upstream.rstrip("/"), args.out)).serve_forever()


if __name__ == "__main__":
    main()
