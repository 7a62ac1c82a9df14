"""The service's HTTP listener: webhook paths (POST) and /metrics (GET), served by aiohttp.

The only module that imports aiohttp, and only when a runbook has a webhook trigger. Its
server runs on an asyncio loop of its own in one thread; what blocks (the store, the audit
log, gathering metrics) runs in a small pool of worker threads, so a slow disk never stops
the loop from reading other requests.

Limits, so that no client can hold the service:
- header timeout: a connection must send a whole request head within HEADER_TIMEOUT_S of
  connecting (or of its previous answer), else it is closed (aiohttp's keep-alive timer,
  which runs from the connection's start and closes a handler still waiting for a request;
  a client sending a byte at a time is cut off like an idle one). With TLS the handshake
  has the same limit;
- body timeout: the body must arrive within BODY_TIMEOUT_S (408 otherwise);
- header size: MAX_LINE_BYTES per line, MAX_HEADERS headers (aiohttp answers 400 beyond);
- body size: 1 MiB, like every event (413; refused from Content-Length before reading);
- connections: at most `max_connections` at once; one more gets a 503 and is closed.
Answers that aiohttp makes itself (a request it cannot parse) are recorded like the others.

/metrics: the exposition of `opsrun metrics` plus the webhook counters. It needs no
authentication when the listener is on a loopback address; elsewhere it is served only with
--webhook-metrics-token (a secret name; then `Authorization: Bearer <secret>`), and answers
403 without it, since it names runbooks and counts of runs.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from opsrun.errors import UsageError
from opsrun.event import MAX_EVENT_BYTES
from opsrun.sources.webhook import RECORD_EVERY_S, Reply, Route, WebhookReceiver
from opsrun.webhook import check_auth

if TYPE_CHECKING:
    from aiohttp import web

Log = Callable[..., None]
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 10.0
MAX_LINE_BYTES = 8190
MAX_HEADERS = 64
DEFAULT_MAX_CONNECTIONS = 256
WORKERS = 4
_BUSY_BODY = b'{"error": "too many connections"}'
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: "
         b"application/json\r\nContent-Length: " + str(len(_BUSY_BODY)).encode()
         + b"\r\nConnection: close\r\n\r\n" + _BUSY_BODY)


class ListenOptions(NamedTuple):
    host: str
    port: int
    tls_cert: Path | None = None
    tls_key: Path | None = None
    metrics_token: str | None = None  # the secret's value, when /metrics needs one
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    header_timeout_s: float = HEADER_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert is not None else "http"

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class HttpListener:
    """The listener; `start` binds (UsageError if it cannot), `stop` ends it."""

    def __init__(self, opts: ListenOptions, receiver: WebhookReceiver,
                 metrics: Callable[[], str], log: Log) -> None:
        self.opts, self.receiver, self.metrics, self.log = opts, receiver, metrics, log
        self.address: tuple[str, int] = (opts.host, opts.port)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="opsrun-webhook")
        self._server: Any = None

    @property
    def url(self) -> str:
        host = f"[{self.address[0]}]" if ":" in self.address[0] else self.address[0]
        return f"{self.opts.scheme}://{host}:{self.address[1]}"

    def open_connections(self) -> int:
        """How many HTTP connections are open now."""
        return len(self._server.connections) if self._server is not None else 0

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Bind, load TLS, and serve in a thread; raise UsageError when it cannot."""
        context = self._tls()
        sock = self._bind()
        self.address = sock.getsockname()[:2]
        self._thread = threading.Thread(target=self._run, args=(sock, context),
                                        name="opsrun-source-webhook", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._failed is not None:
            raise UsageError(f"the webhook listener could not start: {self._failed}")

    def stop(self) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:  # the loop ended meanwhile
                pass
        if self._thread is not None:
            self._thread.join(timeout=15)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.receiver.recorder.flush(force=True)

    def _tls(self) -> ssl.SSLContext | None:
        cert, key = self.opts.tls_cert, self.opts.tls_key
        if cert is None and key is None:
            return None
        if cert is None or key is None:
            raise UsageError("give both --webhook-tls-cert and --webhook-tls-key (the "
                             "certificate chain and its private key, PEM), or neither")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as e:
            raise UsageError(f"--webhook-tls-cert {cert} / --webhook-tls-key {key}: cannot "
                             f"load them: {getattr(e, 'strerror', None) or e}; give a PEM "
                             "certificate and the key that goes with it") from None
        return context

    def _bind(self) -> socket.socket:
        host, port = self.opts.host, self.opts.port
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.create_server((host, port), family=family, backlog=128)
        except OSError as e:
            raise UsageError(f"--webhook-listen {host}:{port}: cannot listen there: "
                             f"{e.strerror or e}; choose another address or port") from None
        sock.setblocking(False)
        return sock

    # ── the loop's thread ───────────────────────────────────────────────────

    def _run(self, sock: socket.socket, context: ssl.SSLContext | None) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(sock, context))
        except BaseException as e:  # noqa: BLE001 - reported by start() or the health check
            self._failed = e
            self.log("the webhook listener stopped on an error", level="error", error=str(e))
        finally:
            self._ready.set()
            loop.close()
            sock.close()

    async def _serve(self, sock: socket.socket, context: ssl.SSLContext | None) -> None:
        from aiohttp import web

        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = web.Server(self._handle, access_log_class=self._access_class(),
                            access_log=_quiet_logger("access"), logger=_quiet_logger("server"),
                            keepalive_timeout=
                            self.opts.header_timeout_s, max_line_size=MAX_LINE_BYTES,
                            max_field_size=MAX_LINE_BYTES, max_headers=MAX_HEADERS,
                            lingering_time=0)
        self._server = server

        def protocol() -> asyncio.BaseProtocol:
            if len(server.connections) >= self.opts.max_connections:
                loop.run_in_executor(self._pool, self._refuse_busy)
                return _Busy()
            return server()

        listening = await loop.create_server(
            protocol, sock=sock, ssl=context,
            ssl_handshake_timeout=self.opts.header_timeout_s if context else None)
        self.log("webhook listener is ready", url=self.url,
                 paths=",".join(sorted(self.receiver.route_table)) or None)
        self._ready.set()
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), RECORD_EVERY_S / 4)
            except asyncio.TimeoutError:
                await loop.run_in_executor(self._pool, self.receiver.recorder.flush)
        listening.close()
        await server.shutdown(2.0)
        await listening.wait_closed()

    def _refuse_busy(self) -> None:
        self.receiver.refuse(503, "too many connections", None, "")

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        path = request.path
        remote = request.remote or ""
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            headers.setdefault(name.lower(), value)
        if path == "/metrics":
            return await self._metrics(request, headers, remote)
        if request.method != "POST":
            if path in self.receiver.route_table:
                reply = await loop.run_in_executor(
                    self._pool, lambda: self.receiver.refuse(405, "a webhook takes POST",
                                                             path, remote))
                return _response(reply._replace(headers={"Allow": "POST"}), close=True)
            reply = await loop.run_in_executor(
                self._pool, self.receiver.refuse, 404, "no webhook at this path", None, remote)
            return _response(reply, close=True)
        first = await loop.run_in_executor(self._pool, self.receiver.before_body, path,
                                           headers, request.content_length, remote)
        if isinstance(first, Reply):
            return _response(first, close=True)  # its body is not read: close, not linger
        try:
            body = await asyncio.wait_for(_read_body(request, MAX_EVENT_BYTES + 1),
                                          self.opts.body_timeout_s)
        except asyncio.TimeoutError:
            reply = await loop.run_in_executor(
                self._pool, lambda: self.receiver.refuse(
                    408, "the body was not sent in time", path, remote,
                    detail=f"over {self.opts.body_timeout_s:g}s"))
            return _response(reply, close=True)
        except Exception as e:  # noqa: BLE001 - a broken chunked body or the like
            detail = str(e)
            reply = await loop.run_in_executor(
                self._pool, lambda: self.receiver.refuse(400, "the body could not be read",
                                                         path, remote, detail=detail))
            return _response(reply, close=True)
        route: Route = first
        reply = await loop.run_in_executor(self._pool, self.receiver.receive, route, headers,
                                           body, remote)
        return _response(reply, close=reply.status == 413)

    async def _metrics(self, request: web.BaseRequest, headers: dict[str, str],
                       remote: str) -> web.StreamResponse:
        from aiohttp import web

        loop = asyncio.get_running_loop()
        if request.method not in ("GET", "HEAD"):
            reply = await loop.run_in_executor(
                self._pool, lambda: self.receiver.refuse(405, "/metrics takes GET", None,
                                                         remote))
            return _response(reply._replace(headers={"Allow": "GET"}))
        token = self.opts.metrics_token
        if token is not None:
            if check_auth("token", token, headers, None) is not None:
                reply = await loop.run_in_executor(
                    self._pool, lambda: self.receiver.refuse(401, "unauthenticated", None,
                                                             remote, detail="/metrics"))
                return _response(reply)
        elif not self.opts.loopback:
            reply = await loop.run_in_executor(
                self._pool, lambda: self.receiver.refuse(
                    403, "/metrics on a listener that is not on loopback needs "
                         "--webhook-metrics-token", None, remote))
            return _response(reply)
        text = await loop.run_in_executor(self._pool, self._metrics_text)
        response = web.Response(body=text.encode(), headers={
            "Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
        response["opsrun"] = True
        return response

    def _metrics_text(self) -> str:
        from opsrun.metrics import render

        return self.metrics() + render(self.receiver.families())

    def _access_class(self) -> type[Any]:
        from aiohttp.abc import AbstractAccessLogger

        listener = self

        class Access(AbstractAccessLogger):
            """Records the refusals aiohttp answers itself (our own are recorded already)."""

            def log(self, request: Any, response: Any, time: float) -> None:
                if response.status < 400 or response.get("opsrun"):
                    return
                remote = getattr(request, "remote", None) or ""
                loop = asyncio.get_running_loop()
                reason = "the request could not be read" if response.status < 500 \
                    else "the listener failed on the request"
                loop.run_in_executor(listener._pool, lambda: listener.receiver.refuse(
                    response.status, reason, None, remote,
                    detail=getattr(response, "reason", "") or ""))

        return Access


def _quiet_logger(name: str) -> Any:
    """A logger that prints nothing: aiohttp logs a traceback for every request it cannot
    parse, which a flood of hostile requests would turn into a flood of log lines. What
    matters is recorded (rate-limited) by the access logger instead."""
    import logging

    logger = logging.getLogger(f"opsrun-webhook-{name}")  # not under "opsrun": not printed
    logger.propagate = False
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    return logger


async def _read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The body, or its first `limit` bytes when it is longer."""
    data = bytearray()
    while len(data) < limit:
        chunk = await request.content.read(min(65536, limit - len(data)))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _response(reply: Reply, *, close: bool = False) -> web.StreamResponse:
    from aiohttp import web

    response = web.json_response(dict(reply.body), status=reply.status,
                                 headers=dict(reply.headers))
    response["opsrun"] = True
    if close:
        response.force_close()
    return response


class _Busy(asyncio.Protocol):
    """Over the connection limit: answer 503 at once and close."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_BUSY)
        transport.close()
