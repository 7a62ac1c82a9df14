"""Soak: `opsrun watch` under a steady mixed load; memory, descriptors and latency must stay flat.

    python bench/soak.py [--minutes N] [--rate R] [--keep DIR]

For N minutes (default 10) the real service gets, every second: R emitted events (one
`opsrun emit -` call), R lines appended to a followed log, R files dropped in a watched
folder (the oldest removed again, so the folder stays small), and a schedule fires every
second. Every run's step records when it started and when its event was made.

Each minute it prints the service's RSS, open file descriptors, threads, the runs that
minute, run latency (event made → step started: median and 95th percentile; for `emit`
this includes starting the `opsrun emit` process), the size of state.db and audit.jsonl
and the files left in <state>/runs. At the end a verdict compares the last minute with
the first: RSS within 10% (or 5 MB), descriptors and threads within 2, median latency
within 2x (or 20 ms). Everything stays on this machine and stops by itself.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def opsrun_cmd() -> list[str]:
    exe = shutil.which("opsrun", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "opsrun"]


@dataclass
class Minute:
    """What one minute of the soak looked like."""

    minute: int
    rss_mb: float
    fds: int
    threads: int
    runs: int
    p50_ms: float
    p95_ms: float
    by_source: dict[str, float]
    db_mb: float
    audit_mb: float
    lock_files: int

    def line(self) -> str:
        sources = " ".join(f"{k} {v:.0f}" for k, v in sorted(self.by_source.items()))
        return (f"minute {self.minute:>2}: RSS {self.rss_mb:6.1f} MB, fds {self.fds:3d}, "
                f"threads {self.threads:3d}, runs {self.runs:5d}, latency p50 "
                f"{self.p50_ms:6.1f} ms p95 {self.p95_ms:6.1f} ms ({sources}), "
                f"state.db {self.db_mb:.1f} MB, audit {self.audit_mb:.1f} MB, "
                f"lock files {self.lock_files}")


class Soak:
    def __init__(self, work: Path, rate: int) -> None:
        self.work = work
        self.rate = rate
        self.state = work / "state"
        self.marks = work / "marks"
        self.log = work / "app.log"
        self.drop = work / "drop"
        self.runbooks = work / "runbooks"
        self.env = {**os.environ, "OPSRUN_STATE_DIR": str(self.state)}
        for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "STATE_DIRECTORY"):
            self.env.pop(var, None)
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0
        self._serial = 0

    def setup(self) -> None:
        self.runbooks.mkdir(parents=True)
        self.drop.mkdir()
        self.log.write_text("")
        m = self.marks
        stamp = "$(date +%s.%N)"
        runbooks = {
            "emit.yaml": f"""\
                on: [{{event: {{where: {{kind: soak}}}}}}]
                concurrency: {{policy: parallel}}
                steps:
                  - run: echo "emit ${{{{ event.made }}}} {stamp}" >> {m}
                """,
            "log.yaml": f"""\
                on: [{{log: {{path: {self.log}, match: 'SOAK made=(?P<made>[0-9.]+)'}}}}]
                concurrency: {{policy: parallel}}
                steps:
                  - run: echo "log ${{{{ event.made }}}} {stamp}" >> {m}
                """,
            "file.yaml": f"""\
                on: [{{file: {{paths: ["{self.drop}/*.txt"], events: [added]}}}}]
                concurrency: {{policy: parallel}}
                steps:
                  - run: echo "file $(cat ${{{{ event.path }}}} 2>/dev/null || echo 0) {stamp}" >> {m}
                """,
            "tick.yaml": f"""\
                on: [{{schedule: {{cron: "* * * * * *"}}}}]
                concurrency: {{policy: skip}}
                steps:
                  - run: echo "schedule $(date -d ${{{{ event.scheduled_for }}}} +%s.%N) {stamp}" >> {m}
                """,
        }
        for name, text in runbooks.items():
            (self.runbooks / name).write_text(textwrap.dedent(text))

    def start(self) -> None:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        path = self.work / "notify.sock"
        notify.bind(str(path))
        notify.settimeout(30)
        log = open(self.work / "watch.log", "ab")
        self.proc = subprocess.Popen([*opsrun_cmd(), "watch", "--runbooks", str(self.runbooks)],
                                     env={**self.env, "NOTIFY_SOCKET": str(path)},
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        try:
            while b"READY=1" not in notify.recv(65536):
                pass
        finally:
            notify.close()

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout=120)

    # ── the load ────────────────────────────────────────────────────────────

    def one_second(self) -> None:
        now = time.time()
        events = "".join(json.dumps({"kind": "soak", "made": f"{now:.6f}"}) + "\n"
                         for _ in range(self.rate))
        emit = subprocess.Popen([*opsrun_cmd(), "emit", "-"], env=self.env,
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        assert emit.stdin is not None
        emit.stdin.write(events.encode())
        emit.stdin.close()
        with self.log.open("a") as f:
            for _ in range(self.rate):
                f.write(f"{time.time():.6f} INFO SOAK made={time.time():.6f} ok\n")
        for _ in range(self.rate):
            self._serial += 1
            (self.drop / f"{self._serial}.txt").write_text(f"{time.time():.6f}")
            old = self.drop / f"{self._serial - 20 * self.rate}.txt"
            old.unlink(missing_ok=True)
        emit.wait(timeout=60)

    # ── the figures ─────────────────────────────────────────────────────────

    def latencies(self) -> dict[str, list[float]]:
        """Latencies (ms) of the runs recorded since the last call, by source."""
        with self.marks.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        out: dict[str, list[float]] = {}
        for line in data[:end].decode().splitlines():
            try:
                source, made, started = line.split()
                out.setdefault(source, []).append((float(started) - float(made)) * 1000)
            except ValueError:
                continue
        return out

    def measure(self, minute: int) -> Minute:
        assert self.proc is not None
        pid = self.proc.pid
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        lat = self.latencies()
        every = [x for values in lat.values() for x in values]
        every.sort()

        def size(p: Path) -> float:
            return p.stat().st_size / 1e6 if p.exists() else 0.0

        runs_dir = self.state / "runs"
        return Minute(
            minute, int(fields["VmRSS"].split()[0]) / 1024, len(os.listdir(f"/proc/{pid}/fd")),
            int(fields["Threads"]), len(every),
            statistics.median(every) if every else 0.0,
            every[int(len(every) * 0.95) - 1] if every else 0.0,
            {k: statistics.median(v) for k, v in lat.items()},
            size(self.state / "state.db") + size(self.state / "state.db-wal"),
            size(self.state / "audit.jsonl"),
            len(list(runs_dir.glob("*.lock"))) if runs_dir.exists() else 0)

    def run(self, minutes: int) -> list[Minute]:
        self.setup()
        self.start()
        rows: list[Minute] = []
        try:
            t0 = time.monotonic()
            for minute in range(1, minutes + 1):
                while time.monotonic() < t0 + 60 * minute:
                    tick = time.monotonic()
                    self.one_second()
                    # The load's pace: one round a second, whatever the round took.
                    time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
                rows.append(self.measure(minute))
                print(rows[-1].line(), flush=True)
        finally:
            code = self.stop()
            print(f"opsrun watch stopped with exit code {code}")
        return rows


def verdict(rows: list[Minute]) -> tuple[bool, list[str]]:
    """Whether the last minute looks like the first; and why not."""
    first, last = rows[0], rows[-1]
    problems = []
    if last.rss_mb > max(first.rss_mb * 1.10, first.rss_mb + 5):
        problems.append(f"RSS grew from {first.rss_mb:.1f} to {last.rss_mb:.1f} MB")
    if last.fds > first.fds + 2:
        problems.append(f"open descriptors grew from {first.fds} to {last.fds}")
    if last.threads > first.threads + 2:
        problems.append(f"threads grew from {first.threads} to {last.threads}")
    if last.p50_ms > max(first.p50_ms * 2, first.p50_ms + 20):
        problems.append(f"median latency grew from {first.p50_ms:.0f} to {last.p50_ms:.0f} ms")
    if last.lock_files > first.lock_files + 2:
        problems.append(f"lock files grew from {first.lock_files} to {last.lock_files}")
    return not problems, problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=int, default=10)
    ap.add_argument("--rate", type=int, default=2,
                    help="events, log lines and files per second, each (default 2)")
    ap.add_argument("--keep", type=Path, default=None, help="work in this new folder, keep it")
    args = ap.parse_args()
    if args.minutes < 2:
        ap.error("--minutes must be at least 2 to compare a first and a last minute")
    if args.keep is not None:
        args.keep.mkdir(parents=True)
        rows = Soak(args.keep.resolve(), args.rate).run(args.minutes)
    else:
        with tempfile.TemporaryDirectory(prefix="opsrun-soak-") as tmp:
            rows = Soak(Path(tmp), args.rate).run(args.minutes)
    flat, problems = verdict(rows)
    print("verdict: flat (last minute vs first: RSS, descriptors, threads, latency, lock "
          "files)" if flat else "verdict: NOT flat: " + "; ".join(problems))
    return 0 if flat else 1


if __name__ == "__main__":
    raise SystemExit(main())
