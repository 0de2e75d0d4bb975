"""The node's HTTP endpoint for ops: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``.

``/healthz`` answers 200 while the process can answer at all.  ``/readyz`` answers 200 only when
every check passes (SCP listening, index writable, models loaded, disk above the watermark) and
503 otherwise; its body lists each check, so a probe's log says what is wrong.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

log = logging.getLogger("appliance.exposition")

#: A readiness check returns (ok, detail); detail is a short sentence without PHI.
Check = Callable[[], tuple[bool, str]]


class _Handler(BaseHTTPRequestHandler):
    server: "OpsServer"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self.server.before_scrape()
            self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send(200, b"ok\n", "text/plain; charset=utf-8")
        elif path == "/readyz":
            results = {}
            for name, check in self.server.checks.items():
                try:
                    results[name] = check()
                except Exception as e:  # a failing check is a not-ready answer, not a crash
                    results[name] = (False, f"check failed: {type(e).__name__}")
            ready = all(ok for ok, _ in results.values())
            body = {"ready": ready, "checks": {k: {"ok": ok, "detail": d} for k, (ok, d) in results.items()}}
            self._send(200 if ready else 503, (json.dumps(body, indent=1) + "\n").encode(), "application/json")
        else:
            self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain; charset=utf-8")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # scrapes every few seconds: not worth a log line
        pass


class OpsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, bind: str, port: int, checks: dict[str, Check], before_scrape: Callable[[], None]):
        super().__init__((bind, port), _Handler)
        self.checks = checks
        self.before_scrape = before_scrape
        self._thread = threading.Thread(target=self.serve_forever, name="ops-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
