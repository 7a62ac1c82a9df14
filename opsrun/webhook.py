"""Webhook requests → events: secret names, authentication, and the payload shapes. Pure.

Nothing here reads a socket, a clock other than the events' `time`, or the store: the
listener (opsrun.service.http_listener) reads the request, opsrun.sources.webhook decides
and queues, and these functions say whether a request carries its secret and which events
its body makes.

Authentication (each webhook trigger names one secret, never writes it):
- `token: NAME`: the request carries `Authorization: Bearer <secret>`;
- `hmac: NAME`: the request carries GitHub's `X-Hub-Signature-256: sha256=<hex>`, the
  HMAC-SHA256 of the raw body keyed with the secret.
Both are compared with hmac.compare_digest, so the time taken does not tell how much of a
guess was right.

Shapes:
- `json`: the body (a JSON object) is one event, kept as sent; `source`, `id` and `time`
  are added where missing, as for `opsrun emit`.
- `alertmanager`: Alertmanager's webhook payload (version 4) makes one event per alert:
  the alert's own fields (status, labels, annotations, startsAt, endsAt, generatorURL,
  fingerprint) and its group's receiver, groupKey, groupLabels, commonLabels,
  commonAnnotations and externalURL. Its id is `<fingerprint>:<status>`; its dedupe key
  adds startsAt, so a notification Alertmanager repeats is a duplicate while an alert that
  resolved and fired again (a new startsAt) is not.
Every event also gets `webhook: {path, headers}`: the request's path and the headers of
EXPOSED_HEADERS that it sent (names in lower case). Never credentials.
"""
from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from opsrun.event import Event, from_object

SOURCE = "webhook"
SECRET_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SECRET_EXPR_RE = re.compile(r"\$\{\{\s*secrets\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
SIGNATURE_HEADER = "x-hub-signature-256"
# Headers a runbook may read as event.webhook.headers (lower case); none carries a secret.
EXPOSED_HEADERS = ("content-type", "user-agent", "x-github-event", "x-github-delivery",
                   "x-github-hook-id", "x-gitlab-event", "x-request-id")
ALERT_FIELDS = ("status", "labels", "annotations", "startsAt", "endsAt", "generatorURL",
                "fingerprint")
GROUP_FIELDS = ("receiver", "groupKey", "groupLabels", "commonLabels", "commonAnnotations",
                "externalURL")
ALERTMANAGER_FIELDS = (*ALERT_FIELDS, *GROUP_FIELDS, "webhook")
ALERT_STATUSES = ("firing", "resolved")


class BadPayload(ValueError):
    """A body that is JSON but not what the trigger's shape expects; the message says why."""


class Shaped(NamedTuple):
    """One event a request makes, with its dedupe key (None: never a duplicate)."""

    event: Event
    dedupe_key: str | None


def secret_name(text: str) -> str:
    """The secret a trigger names: `NAME` or `${{ secrets.NAME }}`; ValueError otherwise."""
    found = _SECRET_EXPR_RE.fullmatch(text.strip())
    if found:
        return found.group(1)
    if SECRET_NAME_RE.fullmatch(text):
        return text
    raise ValueError("give the name of a secret (letters, digits and _, like AM_TOKEN, "
                     "set as OPSRUN_SECRET_AM_TOKEN or in the --secrets-file) or "
                     "${{ secrets.AM_TOKEN }}; a runbook never holds the secret itself")


def check_auth(scheme: str, secret: str, headers: Mapping[str, str],
               body: bytes | None) -> str | None:
    """None when the request proves it knows `secret`; else why not, for the log.

    `headers` has lower-case names. `scheme` is "token" (a bearer token; the body is not
    needed) or "hmac" (X-Hub-Signature-256 over `body`).
    """
    if scheme == "token":
        given = headers.get("authorization")
        if given is None:
            return "no Authorization header"
        kind, _, token = given.strip().partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            return "the Authorization header is not `Bearer <token>`"
        if not hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"),
                                   secret.encode()):
            return "wrong bearer token"
        return None
    signature = headers.get(SIGNATURE_HEADER)
    if signature is None:
        return "no X-Hub-Signature-256 header"
    signature = signature.strip()
    if not signature.startswith("sha256="):
        return "the X-Hub-Signature-256 header is not sha256=<hex>"
    expected = "sha256=" + hmac.new(secret.encode(), body or b"", hashlib.sha256).hexdigest()
    if not hmac.compare_digest(signature.lower().encode("utf-8", "surrogateescape"),
                               expected.encode()):
        return "bad signature"
    return None


def sign(secret: str, body: bytes) -> str:
    """The X-Hub-Signature-256 value a sender computes (for tests, benches and docs)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def request_info(path: str, headers: Mapping[str, str]) -> dict[str, Any]:
    """`event.webhook`: the path and the exposed headers the request sent."""
    return {"path": path,
            "headers": {name: headers[name] for name in EXPOSED_HEADERS if name in headers}}


def shape_events(shape: str, body: Event, path: str,
                 headers: Mapping[str, str]) -> list[Shaped]:
    """The events a parsed body makes under `shape`; BadPayload when it does not fit."""
    info = request_info(path, headers)
    if shape == "alertmanager":
        return _alertmanager(body.data, info)
    data = dict(body.data)
    data["source"] = data.get("source", SOURCE)
    data["webhook"] = info
    return [Shaped(from_object(data, SOURCE), None)]


def _alertmanager(payload: Mapping[str, Any], info: dict[str, Any]) -> list[Shaped]:
    version = payload.get("version")
    if version is not None and str(version) != "4":
        raise BadPayload(f"Alertmanager payload version {version!r}; opsrun reads version 4")
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        raise BadPayload("not an Alertmanager payload: it has no `alerts` list")
    group = {k: payload[k] for k in GROUP_FIELDS if k in payload}
    out = []
    for n, alert in enumerate(alerts):
        if not isinstance(alert, Mapping):
            raise BadPayload(f"alerts[{n}] is not an object")
        fingerprint, status = alert.get("fingerprint"), alert.get("status")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise BadPayload(f"alerts[{n}] has no fingerprint")
        if status not in ALERT_STATUSES:
            raise BadPayload(f"alerts[{n}].status is {status!r}, not firing or resolved")
        data: dict[str, Any] = {"source": SOURCE, "id": f"{fingerprint}:{status}"}
        data.update(group)
        data.update({k: alert[k] for k in ALERT_FIELDS if k in alert})
        data.setdefault("labels", {})
        data.setdefault("annotations", {})
        data["webhook"] = info
        dedupe = f"{fingerprint}:{status}:{alert.get('startsAt', '')}"
        out.append(Shaped(from_object(data, SOURCE), dedupe))
    return out
