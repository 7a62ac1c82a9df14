"""The webhook listener in this process, through real HTTP clients on 127.0.0.1.

What the service does with the queued events (runs, reloads, stopping right after a 202)
is in tests/test_webhook_service.py; the pure parts (auth, shapes) are checked here too.
"""
from __future__ import annotations

import http.client
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from opsrun.audit.log import AuditLog
from opsrun.criteria import parse_where
from opsrun.event import MAX_EVENT_BYTES
from opsrun.runbook import WebhookTrigger
from opsrun.service.http_listener import HttpListener, ListenOptions
from opsrun.service.webhooks import parse_listen
from opsrun.sources.webhook import WebhookReceiver, routes
from opsrun.store import Store
from opsrun.webhook import check_auth, secret_name, sign
from tests.helpers.wait import wait_for

TOKEN = "am-token-0123456789"
HMAC = "gh-secret-abcdef"
SECRETS = {"AM_TOKEN": TOKEN, "GH_SECRET": HMAC, "METRICS": "metrics-token-xyz"}


def trigger(path: str, scheme: str = "token", secret: str = "AM_TOKEN", shape: str = "json",
            where: dict[str, Any] | None = None) -> WebhookTrigger:
    return WebhookTrigger(path, scheme, secret, shape, parse_where(where or {}))


TRIGGERS = [("am", trigger("/hooks/am", shape="alertmanager")),
            ("json", trigger("/hooks/json")),
            ("gh", trigger("/hooks/github", "hmac", "GH_SECRET"))]


def alert(fingerprint: str, status: str = "firing", starts: str = "2026-12-07T08:00:00Z",
          **labels: str) -> dict[str, Any]:
    return {"status": status, "labels": {"alertname": "DiskFull", **labels},
            "annotations": {"summary": "disk full"}, "startsAt": starts,
            "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "http://prom/graph",
            "fingerprint": fingerprint}


def alertmanager(*alerts: dict[str, Any]) -> bytes:
    return json.dumps({
        "version": "4", "groupKey": '{}:{alertname="DiskFull"}', "truncatedAlerts": 0,
        "status": "firing", "receiver": "opsrun", "groupLabels": {"alertname": "DiskFull"},
        "commonLabels": {"alertname": "DiskFull"}, "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093", "alerts": list(alerts)}).encode()


class Hook:
    """A receiver and its listener on a free port, over a store in tmp_path."""

    def __init__(self, tmp: Path, *, max_queue: int = 10_000, max_connections: int = 256,
                 header_timeout_s: float = 10.0, body_timeout_s: float = 10.0,
                 tls: tuple[Path, Path] | None = None, metrics_token: str | None = None,
                 record_every_s: float = 60.0) -> None:
        self.state = tmp / "state"
        self.store = Store.open(self.state)
        self.audit = AuditLog(self.state / "audit.jsonl", store=self.store)
        self.logged: list[tuple[str, dict[str, Any]]] = []
        self.woken = threading.Event()
        self.receiver = WebhookReceiver(self.store, self.audit, self.log, SECRETS,
                                        self.woken.set, max_queue=max_queue,
                                        record_every_s=record_every_s)
        self.receiver.set_routes(routes(TRIGGERS))
        opts = ListenOptions("127.0.0.1", 0, tls[0] if tls else None, tls[1] if tls else None,
                             metrics_token, max_connections, header_timeout_s, body_timeout_s)
        self.listener = HttpListener(opts, self.receiver, lambda: "opsrun_service_up 1\n",
                                     self.log)
        self.listener.start()
        self.port = self.listener.address[1]
        self.tls_context: ssl.SSLContext | None = None

    def log(self, message: str, **fields: Any) -> None:
        self.logged.append((message, fields))

    def connection(self, timeout: float = 10) -> http.client.HTTPConnection:
        if self.tls_context is not None:
            return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout,
                                               context=self.tls_context)
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None
                ) -> tuple[int, Any, http.client.HTTPResponse]:
        conn = self.connection()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        kind = resp.getheader("Content-Type") or ""
        return resp.status, json.loads(raw) if "json" in kind else raw.decode(), resp

    def post(self, path: str, body: bytes, *, token: str | None = TOKEN,
             headers: dict[str, str] | None = None) -> tuple[int, Any, http.client.HTTPResponse]:
        sent = {"Content-Type": "application/json", **(headers or {})}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        return self.request("POST", path, body, sent)

    def queued(self) -> list[dict[str, Any]]:
        return [q.event for q in self.store.peek_events(100_000)]

    def records(self, kind: str) -> list[dict[str, Any]]:
        path = self.state / "audit.jsonl"
        if not path.exists():
            return []
        return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]

    def close(self) -> None:
        self.listener.stop()
        self.store.close()


@pytest.fixture
def hook(tmp_path: Path) -> Iterator[Hook]:
    h = Hook(tmp_path)
    yield h
    h.close()


def good(h: Hook) -> None:
    """The listener still answers a good request with 202 and queues its event."""
    before = len(h.queued())
    status, body, _ = h.post("/hooks/json", json.dumps({"ping": time.time()}).encode())
    assert status == 202, body
    assert len(h.queued()) == before + 1


# ── authentication ─────────────────────────────────────────────────────────

def test_a_bearer_token_is_needed_and_the_event_is_queued_before_the_202(hook: Hook) -> None:
    status, body, _ = hook.post("/hooks/json", b'{"action": "deploy", "id": "d-1"}')
    assert status == 202 and body["queued"] == 1 and body["events"] == ["d-1"]
    (event,) = hook.queued()
    assert event["action"] == "deploy" and event["source"] == "webhook" and event["id"] == "d-1"
    assert event["webhook"] == {"path": "/hooks/json",
                                "headers": {"content-type": "application/json"}}
    (item,) = hook.store.peek_events()
    assert item.source["via"] == "webhook" and item.source["path"] == "/hooks/json"
    assert hook.woken.is_set()
    for token, why in ((None, "no Authorization header"), ("wrong", "wrong bearer token"),
                       (TOKEN[:-1], "wrong bearer token")):
        status, body, _ = hook.post("/hooks/json", b'{"a": 1}', token=token)
        assert (status, body) == (401, {"error": "unauthenticated"})
    status, _, _ = hook.post("/hooks/json", b'{"a": 1}', token=None,
                             headers={"Authorization": f"Basic {TOKEN}"})
    assert status == 401
    assert len(hook.queued()) == 1
    (record,) = hook.records("webhook.refused")  # three of a kind in one interval: one record
    assert record["status"] == 401 and record["path"] == "/hooks/json" and record["count"] == 1


def test_a_github_signature_is_checked_over_the_raw_body(hook: Hook) -> None:
    body = b'{"action": "opened", "number": 7}'
    headers = {"X-GitHub-Event": "pull_request", "X-GitHub-Delivery": "72d3162e",
               "X-Hub-Signature-256": sign(HMAC, body)}
    status, reply, _ = hook.post("/hooks/github", body, token=None, headers=headers)
    assert status == 202, reply
    (event,) = hook.queued()
    assert event["action"] == "opened"
    assert event["webhook"]["headers"]["x-github-event"] == "pull_request"
    assert "x-hub-signature-256" not in event["webhook"]["headers"]
    bad = [{**headers, "X-Hub-Signature-256": sign("other", body)},
           {**headers, "X-Hub-Signature-256": sign(HMAC, body + b" ")},
           {**headers, "X-Hub-Signature-256": sign(HMAC, body).replace("sha256=", "sha1=")},
           {k: v for k, v in headers.items() if k != "X-Hub-Signature-256"}]
    for sent in bad:
        status, reply, _ = hook.post("/hooks/github", body, token=None, headers=sent)
        assert status == 401, sent
    # A bearer token is not what this path takes.
    assert hook.post("/hooks/github", body)[0] == 401
    assert len(hook.queued()) == 1


def test_check_auth_and_secret_names() -> None:
    assert check_auth("token", "s", {"authorization": "Bearer s"}, None) is None
    assert check_auth("token", "s", {"authorization": "bearer  s "}, None) is None
    assert check_auth("hmac", "k", {"x-hub-signature-256": sign("k", b"x").upper()
                                    .replace("SHA256=", "sha256=")}, b"x") is None
    assert secret_name("AM_TOKEN") == "AM_TOKEN"
    assert secret_name("${{ secrets.AM_TOKEN }}") == "AM_TOKEN"
    with pytest.raises(ValueError, match="never holds the secret itself"):
        secret_name("hunter2!")
    assert parse_listen("127.0.0.1:9410") == ("127.0.0.1", 9410)
    assert parse_listen("[::1]:80") == ("::1", 80)
    assert parse_listen(":9410") == ("127.0.0.1", 9410)


# ── refusals ───────────────────────────────────────────────────────────────

def test_unknown_paths_methods_and_bodies_are_refused(hook: Hook) -> None:
    assert hook.post("/hooks/nope", b"{}")[0] == 404
    assert hook.post("/", b"{}")[0] == 404
    status, _, resp = hook.request("GET", "/hooks/json")
    assert status == 405 and resp.getheader("Allow") == "POST"
    for body in (b"not json", b"[1, 2]", b'"text"', b"{\"a\": NaN}", b"\xff\xfe{}",
                 b"[" * 100 + b"]" * 100):
        status, reply, _ = hook.post("/hooks/json", body)
        assert status == 400, body
        assert reply == {"error": "the body is not a JSON event of this webhook"}
    status, reply, _ = hook.post("/hooks/am", b'{"alerts": "none"}')
    assert status == 400
    assert hook.queued() == []
    good(hook)
    refused = hook.records("webhook.refused")
    assert {(r["status"], r["path"]) for r in refused} == {
        (404, None), (405, "/hooks/json"), (400, "/hooks/json"), (400, "/hooks/am")}
    assert any("not JSON" in (r["detail"] or "") for r in refused)


def test_a_body_over_one_mib_is_refused_with_413(hook: Hook) -> None:
    big = b'{"a": "' + b"x" * MAX_EVENT_BYTES + b'"}'
    status, _, _ = hook.post("/hooks/json", big)  # Content-Length: refused before reading
    assert status == 413

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    conn = hook.connection()
    conn.request("POST", "/hooks/json", body=chunks(), encode_chunked=True,
                 headers={"Authorization": f"Bearer {TOKEN}", "Transfer-Encoding": "chunked"})
    try:
        assert conn.getresponse().status == 413  # no length given: refused once read
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may close before the client has sent it all
    conn.close()
    assert hook.queued() == []
    good(hook)
    assert {r["status"] for r in hook.records("webhook.refused")} == {413}


def test_a_full_queue_answers_503_with_retry_after(tmp_path: Path) -> None:
    h = Hook(tmp_path, max_queue=3)
    try:
        for n in range(3):
            assert h.post("/hooks/json", json.dumps({"n": n}).encode())[0] == 202
        status, body, resp = h.post("/hooks/json", b'{"n": 3}')
        assert status == 503 and body == {"error": "the event queue is full"}
        assert resp.getheader("Retry-After") == "10"
        # A request of several events is queued whole or not at all.
        h.store.take_events(1)
        (item,) = h.store.peek_events(1)
        h.store.accept_queued(item.id, [])
        status, body, _ = h.post("/hooks/am", alertmanager(alert("a"), alert("b")))
        assert status == 202 and body["queued"] == 2
        assert h.post("/hooks/am", alertmanager(alert("c")))[0] == 503
        assert len(h.queued()) == 4
        records = h.records("webhook.refused")  # one per path
        assert [(r["status"], r["path"]) for r in records] == [(503, "/hooks/json"),
                                                                (503, "/hooks/am")]
        assert "limit is 3" in records[0]["detail"]
    finally:
        h.close()


def test_refusals_are_recorded_once_per_interval_with_a_count(tmp_path: Path) -> None:
    h = Hook(tmp_path, record_every_s=3600)
    try:
        for _ in range(40):
            assert h.post("/hooks/json", b"{}", token="guess")[0] == 401
        for n in range(10):
            assert h.post(f"/probe/{n}", b"{}")[0] == 404
        assert [r["count"] for r in h.records("webhook.refused")] == [1, 1]
        h.receiver.recorder.flush(force=True)
        counts = {r["status"]: r["count"] for r in h.records("webhook.refused")[2:]}
        assert counts == {401: 39, 404: 9}
        # The log got the same: two lines, then two summaries.
        assert len([m for m, _ in h.logged if m.startswith("webhook request refused")]) == 4
        text = h.request("GET", "/metrics")[1]
        assert 'opsrun_webhook_requests_total{path="/hooks/json",code="401"} 40' in text
        assert 'opsrun_webhook_requests_total{path="",code="404"} 10' in text
    finally:
        h.close()


# ── Alertmanager ───────────────────────────────────────────────────────────

def test_an_alertmanager_payload_is_one_event_per_alert(hook: Hook) -> None:
    body = alertmanager(alert("f1", instance="web-1"), alert("f2", instance="web-2"),
                        alert("f3", "resolved", instance="db-1"))
    status, reply, _ = hook.post("/hooks/am", body)
    assert status == 202 and reply["queued"] == 3
    assert reply["events"] == ["f1:firing", "f2:firing", "f3:resolved"]
    events = {e["id"]: e for e in hook.queued()}
    e = events["f2:firing"]
    assert e["labels"] == {"alertname": "DiskFull", "instance": "web-2"}
    assert e["status"] == "firing" and e["fingerprint"] == "f2"
    assert e["annotations"] == {"summary": "disk full"}
    assert e["commonLabels"] == {"alertname": "DiskFull"}
    assert e["externalURL"] == "http://alertmanager:9093" and e["receiver"] == "opsrun"
    assert e["source"] == "webhook" and e["webhook"]["path"] == "/hooks/am"
    assert events["f3:resolved"]["status"] == "resolved"


def test_repeated_alertmanager_notifications_are_not_queued_again(hook: Hook) -> None:
    first = alertmanager(alert("f1"), alert("f2"))
    assert hook.post("/hooks/am", first)[1]["queued"] == 2
    status, reply, _ = hook.post("/hooks/am", first)  # Alertmanager's repeat_interval
    assert status == 202 and reply == {"queued": 0, "duplicates": 2,
                                       "events": ["f1:firing", "f2:firing"]}
    # One new alert in the group: only it is queued.
    assert hook.post("/hooks/am", alertmanager(alert("f1"), alert("f9")))[1]["queued"] == 1
    # Resolved is news; and an alert that fires again later (a new startsAt) is too.
    assert hook.post("/hooks/am", alertmanager(alert("f1", "resolved")))[1]["queued"] == 1
    later = alertmanager(alert("f1", starts="2026-12-07T09:30:00Z"))
    assert hook.post("/hooks/am", later)[1]["queued"] == 1
    assert hook.post("/hooks/am", later)[1]["duplicates"] == 1
    ids = [e["id"] for e in hook.queued()]
    assert ids == ["f1:firing", "f2:firing", "f9:firing", "f1:resolved", "f1:firing"]
    (dup,) = hook.records("webhook.duplicate")
    assert dup["path"] == "/hooks/am" and dup["count"] == 1
    assert hook.receiver.duplicates == 4


def test_the_dedupe_window_ends(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        args = dict(source={"via": "webhook"}, max_depth=100, dedupe_window_s=60.0)
        now = time.time()
        assert store.enqueue_webhook([({"id": "a"}, "k")], now=now, **args).ids
        assert store.enqueue_webhook([({"id": "a"}, "k")], now=now + 59, **args).duplicates == 1
        assert store.enqueue_webhook([({"id": "a"}, "k")], now=now + 61, **args).ids
        # The same key twice in one request: the second is a duplicate.
        done = store.enqueue_webhook([({"id": "b"}, "j"), ({"id": "b"}, "j")], now=now, **args)
        assert len(done.ids) == 1 and done.duplicates == 1


# ── hostile clients ────────────────────────────────────────────────────────

def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed this connection (EOF or reset), without waiting."""
    sock.setblocking(False)
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.setblocking(True)


def test_a_slowloris_client_is_cut_off_and_others_are_served_meanwhile(tmp_path: Path) -> None:
    h = Hook(tmp_path, header_timeout_s=1.0)
    try:
        head = (f"POST /hooks/json HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                "X-Padding: " + "p" * 200 + "\r\n").encode()
        slow = socket.create_connection(("127.0.0.1", h.port))
        started = time.monotonic()
        stop = threading.Event()
        cut = threading.Event()

        def trickle() -> None:
            for byte in head:
                if stop.is_set():
                    return
                try:
                    slow.send(bytes([byte]))
                except OSError:
                    cut.set()
                    return
                stop.wait(0.05)  # the attacker's pace: a byte every 50 ms

        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        good(h)  # while the slow client holds its connection
        wait_for(lambda: cut.is_set() or _closed_by_server(slow), timeout=10,
                 message="the slow client was not cut off")
        took = time.monotonic() - started
        stop.set()
        sender.join(5)
        assert took < 5, took  # cut at the header timeout, long before its head was sent
        good(h)
        slow.close()
    finally:
        h.close()


def test_a_slow_body_gets_408(tmp_path: Path) -> None:
    h = Hook(tmp_path, body_timeout_s=0.5)
    try:
        sock = socket.create_connection(("127.0.0.1", h.port), timeout=10)
        sock.sendall(f"POST /hooks/json HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}"
                     "\r\nContent-Length: 100\r\n\r\n{\"a\"".encode())
        reply = sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 408"), reply
        sock.close()
        good(h)
    finally:
        h.close()


def test_huge_headers_and_garbage_are_refused_and_the_service_goes_on(hook: Hook) -> None:
    status, _, _ = hook.post("/hooks/json", b"{}", headers={"X-Big": "b" * 20_000})
    assert status in (400, 431)
    many = {f"X-H{n}": "v" for n in range(200)}
    assert hook.post("/hooks/json", b"{}", headers=many)[0] in (400, 431)
    for garbage in (b"\x00\xff\xfe\x16\x03\x01 garbage\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                    b"POST /hooks/json HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                    bytes(range(256)) * 4):
        sock = socket.create_connection(("127.0.0.1", hook.port), timeout=10)
        try:
            sock.sendall(garbage)
            sock.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        except (ConnectionResetError, BrokenPipeError):
            reply = b""
        finally:
            sock.close()
        assert reply == b"" or reply.split(b" ")[1] in (b"400", b"404", b"413", b"501"), reply
        good(hook)
    assert hook.queued()[0]["ping"]
    wait_for(lambda: any(r["reason"] == "the request could not be read"
                         for r in hook.records("webhook.refused")), timeout=10)


def test_connections_over_the_limit_get_503(tmp_path: Path) -> None:
    h = Hook(tmp_path, max_connections=3)
    try:
        idle = [socket.create_connection(("127.0.0.1", h.port)) for _ in range(3)]
        wait_for(lambda: h.listener.open_connections() == 3, timeout=10)
        extra = socket.create_connection(("127.0.0.1", h.port), timeout=10)
        reply = b""
        while chunk := extra.recv(65536):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 503"), reply
        assert b"too many connections" in reply
        extra.close()
        for s in idle:
            s.close()
        wait_for(lambda: _answers(h), timeout=10)
        wait_for(lambda: any(r["reason"] == "too many connections"
                             for r in h.records("webhook.refused")), timeout=10)
    finally:
        h.close()


def _answers(h: Hook) -> bool:
    try:
        return h.post("/hooks/json", b'{"after": 1}')[0] == 202
    except (ConnectionError, http.client.HTTPException):
        return False


# ── TLS and /metrics ───────────────────────────────────────────────────────

def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made here (cryptography comes with paramiko)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "opsrun test")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def test_tls_with_a_self_signed_certificate(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    h = Hook(tmp_path, tls=(cert, key), header_timeout_s=1.0)
    try:
        assert h.listener.url.startswith("https://127.0.0.1:")
        h.tls_context = ssl.create_default_context(cafile=str(cert))
        good(h)
        # Plain HTTP to the TLS port is not answered as a request.
        plain = http.client.HTTPConnection("127.0.0.1", h.port, timeout=10)
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            plain.request("POST", "/hooks/json", body=b"{}")
            plain.getresponse().read()
        plain.close()
        # A client that never finishes its handshake is cut off at the header timeout.
        raw = socket.create_connection(("127.0.0.1", h.port), timeout=10)
        raw.sendall(b"\x16\x03\x01")
        wait_for(lambda: _closed_by_server(raw), timeout=10)
        raw.close()
        if shutil.which("curl"):
            out = subprocess.run(
                ["curl", "-sS", "--cacert", str(cert), "-o", "/dev/null", "-w", "%{http_code}",
                 "-H", f"Authorization: Bearer {TOKEN}", "-d", '{"via": "curl"}',
                 f"{h.listener.url}/hooks/json"], capture_output=True, text=True, timeout=60)
            assert out.stdout == "202", out.stderr
        good(h)
    finally:
        h.close()


def test_metrics_are_served_and_can_need_a_token(tmp_path: Path) -> None:
    h = Hook(tmp_path, metrics_token=SECRETS["METRICS"])
    try:
        good(h)
        assert h.request("GET", "/metrics")[0] == 401
        status, text, resp = h.request("GET", "/metrics",
                                       headers={"Authorization": "Bearer metrics-token-xyz"})
        assert status == 200 and resp.getheader("Content-Type").startswith("text/plain")
        assert text.startswith("opsrun_service_up 1\n")
        assert 'opsrun_webhook_requests_total{path="/hooks/json",code="202"} 1' in text
        assert "# TYPE opsrun_webhook_duplicates_total counter" in text
        assert h.request("POST", "/metrics", b"")[0] == 405
    finally:
        h.close()
    assert ListenOptions("127.0.0.1", 1).loopback and ListenOptions("::1", 1).loopback
    assert not ListenOptions("0.0.0.0", 1).loopback


def test_curl_posts_an_alertmanager_payload(hook: Hook) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    out = subprocess.run(
        ["curl", "-sS", "-H", f"Authorization: Bearer {TOKEN}", "-H",
         "Content-Type: application/json", "--data-binary", "@-",
         f"http://127.0.0.1:{hook.port}/hooks/am"],
        input=alertmanager(alert("c1"), alert("c2")), capture_output=True, timeout=60)
    assert json.loads(out.stdout)["queued"] == 2, out.stderr


# ── matching ───────────────────────────────────────────────────────────────

def test_webhook_events_match_the_triggers_of_their_path_only(tmp_path: Path) -> None:
    from opsrun.event import from_object
    from opsrun.matcher import Matcher
    from opsrun.runbook import load_runbooks
    from tests.helpers.files import write

    for name, path, token, alertname in (("a", "/hooks/am", "AM_TOKEN", "DiskFull"),
                                         ("b", "/hooks/am", "AM_TOKEN", "InodesFull"),
                                         ("c", "/hooks/other", "OTHER", "DiskFull")):
        write(tmp_path, f"{name}.yaml", f"""\
            on:
              - webhook: {{path: {path}, token: {token}, where: {{alertname: {alertname}}}}}
            steps:
              - run: echo {name}
            """)
    runbooks, problems = load_runbooks([tmp_path])
    assert problems == [] and len(runbooks) == 3  # a and b share a path: same secret
    matcher = Matcher(runbooks)
    key_c = next(b.key for b in matcher.bound("webhook") if b.runbook.name == "c")

    def names(data: dict[str, Any]) -> list[str]:
        return [m.runbook.name for m in matcher.match(from_object(data, "webhook"))]

    assert names({"alertname": "DiskFull", "webhook": {"path": "/hooks/am"}}) == ["a"]
    assert names({"alertname": "InodesFull", "webhook": {"path": "/hooks/am"}}) == ["b"]
    assert names({"alertname": "DiskFull", "webhook": {"path": "/hooks/other"}}) == ["c"]
    # A body cannot pick another path's trigger (whose secret it did not prove).
    assert names({"alertname": "DiskFull", "trigger": key_c,
                  "webhook": {"path": "/hooks/am"}}) == ["a"]
    assert names({"alertname": "DiskFull"}) == []
    # A JSON event (opsrun emit) never starts a webhook trigger, nor a webhook event an
    # event trigger.
    assert [m.runbook.name for m in matcher.match(from_object(
        {"alertname": "DiskFull", "webhook": {"path": "/hooks/am"}}, "json"))] == []
