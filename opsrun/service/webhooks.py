"""The service's webhook side: the listener is up exactly while some runbook has a webhook.

`WebhookService.update(triggers)` is called with the webhook triggers each time the trigger
sources are (re)started: the first trigger starts the listener, a reload swaps its routes
at once (connections stay open, the port stays bound), and the last trigger's removal
stops it. At the service's start a secret that a trigger names and the service lacks, or
an address it cannot listen on, stops the start with a message (exit 2); after a reload
the same problems are logged and the service goes on (a path whose secret is missing
answers 503).
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from opsrun.errors import UsageError
from opsrun.runbook import WebhookTrigger
from opsrun.runs.context import RunContext

if TYPE_CHECKING:  # imported when used: `opsrun status` needs neither asyncio nor ssl
    from opsrun.service.http_listener import HttpListener, ListenOptions

Log = Callable[..., None]
DEFAULT_LISTEN = "127.0.0.1:9410"
DEFAULT_MAX_QUEUE = 10_000


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:9410` for IPv6, `:9410` for 127.0.0.1); UsageError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--webhook-listen {text!r}: give HOST:PORT, like {DEFAULT_LISTEN} "
                         "(or [::1]:9410; port 0 takes a free port)")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


@dataclass(frozen=True)
class WebhookSettings:
    """The `opsrun watch --webhook-*` options."""

    listen: str = DEFAULT_LISTEN
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_queue: int = DEFAULT_MAX_QUEUE
    metrics_token: str | None = None  # the name of a secret
    max_connections: int = 256

    def check(self, secrets: dict[str, str]) -> None:
        """Refuse options that cannot work, before the service starts."""
        parse_listen(self.listen)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UsageError("give both --webhook-tls-cert and --webhook-tls-key, or neither")
        for flag, file in (("--webhook-tls-cert", self.tls_cert),
                           ("--webhook-tls-key", self.tls_key)):
            if file is not None and not file.is_file():
                raise UsageError(f"{flag} {file}: no such file")
        if self.metrics_token is not None and not secrets.get(self.metrics_token):
            raise UsageError(f"--webhook-metrics-token {self.metrics_token}: the service has "
                             f"no such secret; set OPSRUN_SECRET_{self.metrics_token} or "
                             f"{self.metrics_token}=… in the --secrets-file")


class WebhookService:
    """The receiver and, while there are webhook triggers, the listener."""

    def __init__(self, settings: WebhookSettings, rc: RunContext, log: Log,
                 wake: Callable[[], None], metrics: Callable[[], str]) -> None:
        from opsrun.sources.webhook import WebhookReceiver

        self.settings, self.rc, self.log, self.metrics = settings, rc, log, metrics
        self.receiver = WebhookReceiver(rc.store, rc.audit, log, rc.secrets, wake,
                                        max_queue=settings.max_queue)
        self.listener: HttpListener | None = None
        self._lock = threading.Lock()

    def update(self, triggers: Sequence[tuple[str, WebhookTrigger]], *,
               initial: bool) -> None:
        """Serve these (runbook name, trigger) pairs; start or stop the listener to suit."""
        from opsrun.service.http_listener import HttpListener
        from opsrun.sources.webhook import missing_secrets, routes

        table = routes(triggers)
        missing = missing_secrets(table, self.rc.secrets)
        if missing and initial:
            raise UsageError("; ".join(missing))
        for line in missing:
            self.log("webhook secret missing", level="error", problem=line)
        with self._lock:
            self.receiver.set_routes(table)
            if not table:
                self._stop()
                return
            if self.listener is not None and self.listener.alive():
                return
            listener = HttpListener(self._options(), self.receiver, self.metrics, self.log)
            try:
                listener.start()
            except UsageError as e:
                if initial:
                    raise
                self.log("the webhook listener cannot start", level="error", error=str(e))
                return
            self.listener = listener

    def _options(self) -> ListenOptions:
        from opsrun.service.http_listener import ListenOptions

        host, port = parse_listen(self.settings.listen)
        token = self.settings.metrics_token
        return ListenOptions(host, port, self.settings.tls_cert, self.settings.tls_key,
                             self.rc.secrets.get(token) if token else None,
                             self.settings.max_connections)

    def alive(self) -> bool:
        return self.listener is not None and self.listener.alive()

    @property
    def url(self) -> str | None:
        return self.listener.url if self.alive() and self.listener is not None else None

    def stop(self) -> None:
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        if self.listener is not None:
            self.listener.stop()
            self.listener = None
