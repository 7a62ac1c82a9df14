"""Webhook load on 127.0.0.1: requests/s and latency of 202 answers, beside a bare server.

    python bench/webhook.py [--clients N] [--requests M] [--seconds S]

Both servers get the same bounded load: N client threads, each with its own keep-alive
connection, POST a small JSON event with a bearer token until M requests in all have been
answered or S seconds have passed, whichever comes first. Only 127.0.0.1 is ever sent to.
- opsrun: `opsrun watch` with one webhook trigger (bearer token; its `where:` matches none
  of the events, so no run starts): each 202 means the token was checked, the body parsed
  and the event written to the state store's queue (and the queue drained meanwhile);
- baseline: Python's own http.server (ThreadingHTTPServer, HTTP/1.1) in a process of its
  own, reading the body and answering 202 without checking or writing anything.
The figure is requests/s and the p50/p99 latency of the 202 answers, seen by the client.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TOKEN = "bench-token-0123456789abcdef"
BASELINE = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else each answer waits for a delayed ACK (40 ms)
    wbufsize = 65536  # head and body in one write
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b'{"queued": 1}'
        self.send_response(202)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), H)
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def opsrun_exe() -> list[str]:
    exe = shutil.which("opsrun", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "opsrun"]


def load(port: int, clients: int, requests: int, seconds: float) -> tuple[float, float, float,
                                                                         int]:
    """(requests/s, p50 ms, p99 ms, answers that were not 202) of a bounded load."""
    latencies: list[float] = []
    other = [0]
    lock = threading.Lock()
    left = [requests]
    deadline = time.monotonic() + seconds

    def client(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine: list[float] = []
        bad = 0
        i = 0
        while time.monotonic() < deadline:
            with lock:
                if left[0] <= 0:
                    break
                left[0] -= 1
            body = json.dumps({"kind": "bench", "client": n, "i": i}).encode()
            i += 1
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/hooks/bench", body=body, headers={
                    "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                bad += 1
                continue
            if resp.status == 202:
                mine.append((time.perf_counter() - t0) * 1000)
            else:
                bad += 1
        conn.close()
        with lock:
            latencies.extend(mine)
            other[0] += bad

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - t0
    latencies.sort()
    if not latencies:
        return 0.0, float("nan"), float("nan"), other[0]
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return len(latencies) / took, statistics.median(latencies), p99, other[0]


def start_opsrun(tmp: Path) -> tuple[subprocess.Popen[str], int]:
    rbdir = tmp / "runbooks"
    rbdir.mkdir(parents=True)
    (rbdir / "bench.yaml").write_text(
        "on:\n  - webhook:\n      path: /hooks/bench\n      token: BENCH_TOKEN\n"
        "      where: {kind: never}\nsteps:\n  - run: 'true'\n")
    env = {**os.environ, "OPSRUN_STATE_DIR": str(tmp / "state"),
           "OPSRUN_SECRET_BENCH_TOKEN": TOKEN, "OPSRUN_WEBHOOK_LISTEN": "127.0.0.1:0"}
    p = subprocess.Popen([*opsrun_exe(), "watch", "--runbooks", str(rbdir)], env=env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    assert p.stderr is not None
    port = None
    for line in p.stderr:
        if line.startswith("webhook listener is ready"):
            port = int(line.split("url=http://127.0.0.1:", 1)[1].split()[0])
        if line.startswith("opsrun watch is ready"):
            break
    if port is None:
        p.kill()
        raise RuntimeError("opsrun watch did not start its webhook listener")
    # Keep reading its log: a full pipe would stop the service at its next log line.
    threading.Thread(target=lambda: all(True for _ in p.stderr or ()), daemon=True).start()
    return p, port


def measure(tmp: Path, clients: int = 8, requests: int = 4000,
            seconds: float = 30.0) -> dict[str, tuple[float, float, float, int]]:
    """{"opsrun": …, "baseline": …}: (requests/s, p50 ms, p99 ms, not 202) for each."""
    tmp.mkdir(parents=True, exist_ok=True)
    out = {}
    base = subprocess.Popen([sys.executable, "-c", BASELINE], stdout=subprocess.PIPE, text=True)
    try:
        assert base.stdout is not None
        port = int(base.stdout.readline())
        load(port, clients, min(200, requests), seconds)  # warm up
        out["baseline"] = load(port, clients, requests, seconds)
    finally:
        base.kill()
        base.wait()
    ops, port = start_opsrun(tmp)
    try:
        load(port, clients, min(200, requests), seconds)
        out["opsrun"] = load(port, clients, requests, seconds)
    finally:
        ops.send_signal(signal.SIGTERM)
        try:
            ops.wait(timeout=60)
        except subprocess.TimeoutExpired:
            ops.kill()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="opsrun-bench-webhook-"))
    try:
        figures = measure(tmp, args.clients, args.requests, args.seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.clients} clients, up to {args.requests:,} requests or {args.seconds:g} s")
    print(f"{'':10} {'requests/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'not 202':>8}")
    for name in ("opsrun", "baseline"):
        rps, p50, p99, bad = figures[name]
        print(f"{name:10} {rps:>11,.0f} {p50:>8.2f} {p99:>8.2f} {bad:>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
