"""A real HTTP receiver on 127.0.0.1 for webhook notifications: records each request,
answers with scripted status codes, and can hold answers back until released."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    """`codes` are answered in turn, then `default`; `hold` makes every answer wait for
    release() (a slow webhook)."""

    def __init__(self, codes: list[int] | None = None, default: int = 200,
                 hold: bool = False) -> None:
        self.codes = list(codes or [])
        self.default = default
        self.requests: list[dict[str, Any]] = []
        self.held = 0
        self.released = threading.Event()
        if not hold:
            self.released.set()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                with receiver._lock:
                    code = receiver.codes.pop(0) if receiver.codes else receiver.default
                    receiver.held += 0 if receiver.released.is_set() else 1
                receiver.released.wait(30)
                with receiver._lock:
                    receiver.requests.append({"path": self.path, "headers": dict(self.headers),
                                              "body": json.loads(raw), "code": code})
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

    def bodies(self, code: int | None = 200) -> list[dict[str, Any]]:
        with self._lock:
            return [r["body"] for r in self.requests if code is None or r["code"] == code]
