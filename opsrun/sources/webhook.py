"""The webhook source: requests read by the listener → checked, shaped, queued events.

The HTTP side (sockets, TLS, timeouts, limits) is opsrun.service.http_listener; this module
decides what a request gets, and is called from the listener's worker threads:

- `before_body(path, headers, length)`: the route of the path (404 if none), the bearer
  token (401) and the announced length (413) are checked before the body is read, so a
  refused sender costs no body read;
- `receive(route, headers, body)`: the signature (401), the body (400: not JSON, not an
  object, not the trigger's shape), then every event of the request is written to the
  durable queue in one transaction (503 and Retry-After when the queue is full) BEFORE the
  202 answer: an answered event survives the service stopping right after. The service's
  queue drainer hands them to the matcher as `webhook` events.

Paths: every webhook trigger has a path; runbooks may share one when they check it the same
way (runbook.py refuses the others), and a request to it is matched against each of them.

Refusals never stop the service and are all counted (`families()`, served on /metrics);
the audit log and the service log get one `webhook.refused` record per kind of refusal
(status, reason, path) per RECORD_EVERY_S, carrying `count`, the number of requests it
stands for: a flood of hostile requests adds a bounded number of records. Duplicates are
recorded the same way, as `webhook.duplicate`.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from opsrun import metrics
from opsrun.audit.log import AuditLog
from opsrun.errors import OpsrunError
from opsrun.event import MAX_EVENT_BYTES, EventRejected, parse_json_event
from opsrun.runbook import WebhookTrigger
from opsrun.store import Store
from opsrun.webhook import SOURCE, BadPayload, check_auth, shape_events

Log = Callable[..., None]  # log(message, level=…, **fields)
DEDUPE_WINDOW_S = 24 * 3600.0
RECORD_EVERY_S = 60.0
RETRY_AFTER_S = 10


class Route(NamedTuple):
    """What a path takes: how it is checked and shaped, and the runbooks behind it."""

    path: str
    scheme: str  # token | hmac
    secret: str  # the secret's name
    shape: str
    runbooks: tuple[str, ...]


class Reply(NamedTuple):
    """The answer to a request: status, JSON body, extra headers."""

    status: int
    body: Mapping[str, Any]
    headers: Mapping[str, str] = {}


def routes(triggers: Iterable[tuple[str, WebhookTrigger]]) -> dict[str, Route]:
    """The routes of (runbook name, trigger) pairs; triggers on one path share its checks."""
    out: dict[str, Route] = {}
    for name, t in triggers:
        known = out.get(t.path)
        names = (*known.runbooks, name) if known is not None else (name,)
        out[t.path] = Route(t.path, t.scheme, t.secret, t.shape, names)
    return out


def missing_secrets(table: Mapping[str, Route], secrets: Mapping[str, str]) -> list[str]:
    """A line for each route whose secret the service was not given."""
    return [f"the webhook {r.path} (runbook {', '.join(r.runbooks)}) names the secret "
            f"{r.secret!r}, which the service does not have; set OPSRUN_SECRET_{r.secret} "
            f"in its environment or {r.secret}=… in its --secrets-file"
            for r in table.values() if not secrets.get(r.secret)]


class _Kind(NamedTuple):
    record: str  # the audit kind
    status: int
    reason: str
    path: str | None  # a path of a route, or None: the paths of unknown requests are many


class Recorder:
    """One audit record and one log line per kind of refusal per interval, with a count."""

    def __init__(self, audit: AuditLog, log: Log, every_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.audit, self.log, self.every_s, self.clock = audit, log, every_s, clock
        self._lock = threading.Lock()
        # kind → [when last written, requests since, fields of the latest]
        self._state: dict[_Kind, list[Any]] = {}

    def note(self, kind: _Kind, fields: Mapping[str, Any]) -> None:
        """Count one request of this kind; write a record now if none was this interval."""
        now = self.clock()
        with self._lock:
            state = self._state.get(kind)
            if state is not None and now - state[0] < self.every_s:
                state[1] += 1
                state[2] = fields
                return
            self._state[kind] = [now, 0, fields]
        self._write(kind, fields, 1)

    def flush(self, *, force: bool = False) -> None:
        """Write the counts of the kinds seen since their last record (all, with force)."""
        now = self.clock()
        due = []
        with self._lock:
            for kind, state in self._state.items():
                if state[1] and (force or now - state[0] >= self.every_s):
                    due.append((kind, state[2], state[1]))
                    state[0], state[1] = now, 0
        for kind, fields, count in due:
            self._write(kind, fields, count)

    def _write(self, kind: _Kind, fields: Mapping[str, Any], count: int) -> None:
        record = {"status": kind.status, "reason": kind.reason, "path": kind.path,
                  "count": count, **fields}
        try:
            self.audit.append(kind.record, **record)
        except OpsrunError as e:  # the service goes on; the log still says it
            self.log("cannot write to the audit log", level="error", error=str(e))
        level = "info" if kind.record == "webhook.duplicate" else "warning"
        what = "duplicate webhook event" if kind.record == "webhook.duplicate" \
            else "webhook request refused"
        self.log(what + ("" if count == 1 else f" ({count} since the last record)"),
                 level=level, **{k: v for k, v in record.items() if v is not None})


class WebhookReceiver:
    """Decides each webhook request; thread-safe (the listener calls it from its workers)."""

    def __init__(self, store: Store, audit: AuditLog, log: Log, secrets: Mapping[str, str],
                 wake: Callable[[], None], *, max_queue: int,
                 dedupe_window_s: float = DEDUPE_WINDOW_S,
                 record_every_s: float = RECORD_EVERY_S) -> None:
        self.store, self.log, self.secrets, self.wake = store, log, secrets, wake
        self.max_queue = max_queue
        self.dedupe_window_s = dedupe_window_s
        self.recorder = Recorder(audit, log, record_every_s)
        self._routes: dict[str, Route] = {}
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, int], int] = {}  # (path or "", status) → count
        self.duplicates = 0
        self.last_event: float | None = None  # Unix time of the last queued event

    # ── configuration ──────────────────────────────────────────────────────

    def set_routes(self, table: Mapping[str, Route]) -> None:
        """Serve these routes from now on (a reload swaps the whole table at once)."""
        self._routes = dict(table)

    @property
    def route_table(self) -> Mapping[str, Route]:
        return self._routes

    # ── requests ───────────────────────────────────────────────────────────

    def before_body(self, path: str, headers: Mapping[str, str], length: int | None,
                    remote: str) -> Route | Reply:
        """The route to read the body for, or the refusal (404, 401, 413, 503)."""
        route = self._routes.get(path)
        if route is None:
            return self.refuse(404, "no webhook at this path", None, remote)
        if not self.secrets.get(route.secret):
            return self.refuse(503, "the webhook's secret is not configured", path, remote,
                               detail=f"the service has no secret {route.secret!r}")
        if route.scheme == "token":
            why = check_auth("token", self.secrets[route.secret], headers, None)
            if why is not None:
                return self.refuse(401, "unauthenticated", path, remote, detail=why)
        if length is not None and length > MAX_EVENT_BYTES:
            return self.refuse(413, "the body is over 1 MiB", path, remote,
                               detail=f"Content-Length {length:,}")
        return route

    def receive(self, route: Route, headers: Mapping[str, str], body: bytes,
                remote: str) -> Reply:
        """Check, shape and queue the request's events; 202 once they are in the queue."""
        path = route.path
        if len(body) > MAX_EVENT_BYTES:
            return self.refuse(413, "the body is over 1 MiB", path, remote)
        if route.scheme == "hmac":
            why = check_auth("hmac", self.secrets.get(route.secret, ""), headers, body)
            if why is not None:
                return self.refuse(401, "unauthenticated", path, remote, detail=why)
        try:
            shaped = shape_events(route.shape, parse_json_event(body, SOURCE), path, headers)
        except (EventRejected, BadPayload) as e:
            return self.refuse(400, "the body is not a JSON event of this webhook", path,
                               remote, detail=str(e))
        try:
            done = self.store.enqueue_webhook(
                [(s.event.data, None if s.dedupe_key is None else f"{path} {s.dedupe_key}")
                 for s in shaped],
                source={"via": SOURCE, "path": path, "remote": remote},
                max_depth=self.max_queue, dedupe_window_s=self.dedupe_window_s)
        except OpsrunError as e:  # a full disk, a locked store: the sender tries again
            return self.refuse(503, "the event cannot be queued now", path, remote,
                               detail=str(e), retry=True)
        if done.full:
            return self.refuse(503, "the event queue is full", path, remote,
                               detail=f"{done.depth:,} events wait; the limit is "
                                      f"{self.max_queue:,}", retry=True)
        if done.ids:
            self.last_event = time.time()
            self.wake()
        queued = list(dict.fromkeys(s.event.id for s in shaped))
        if done.duplicates:
            with self._lock:
                self.duplicates += done.duplicates
            self.recorder.note(_Kind("webhook.duplicate", 202, "already queued within "
                                     f"{self.dedupe_window_s / 3600:g}h", path),
                               {"remote": remote, "duplicates": done.duplicates})
        self._count(path, 202)
        return Reply(202, {"queued": len(done.ids), "duplicates": done.duplicates,
                           "events": queued})

    def refuse(self, status: int, reason: str, path: str | None, remote: str, *,
               detail: str = "", retry: bool = False) -> Reply:
        """Count and record a refusal (rate-limited), and the answer to give."""
        known = path if path in self._routes else None
        self._count(known, status)
        self.recorder.note(_Kind("webhook.refused", status, reason, known),
                           {"remote": remote, "detail": detail or None})
        headers = {"Retry-After": str(RETRY_AFTER_S)} if retry else {}
        return Reply(status, {"error": reason}, headers)

    def _count(self, path: str | None, status: int) -> None:
        with self._lock:
            key = (path or "", status)
            self._requests[key] = self._requests.get(key, 0) + 1

    # ── metrics ────────────────────────────────────────────────────────────

    def families(self) -> list[metrics.Family]:
        """opsrun_webhook_requests_total{path,code} and opsrun_webhook_duplicates_total."""
        with self._lock:
            counts = dict(self._requests)
            duplicates = self.duplicates
        name = metrics.PREFIX + "webhook_requests_total"
        dup = metrics.PREFIX + "webhook_duplicates_total"
        return [
            metrics.Family(name, "counter", "Webhook requests answered since the service "
                           "started, by path (empty: not a webhook path) and status code.",
                           tuple(metrics.Sample(name, (("path", p), ("code", str(c))), n)
                                 for (p, c), n in sorted(counts.items()))),
            metrics.Family(dup, "counter", "Webhook events not queued because the same "
                           "event was queued within the dedupe window.",
                           (metrics.Sample(dup, (), duplicates),)),
        ]
