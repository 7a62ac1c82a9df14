"""All of opsrun's figures beside what its users would use instead, measured in one run.

    python bench/run.py [--quick] [--with-peers] [--repeat N]

Each figure is measured several times (the median is shown) in the same run as its
baselines, so the ratio holds on a noisy machine. The table is printed and written to
bench/RESULTS.md with a description of the machine and the date.

Nothing is installed unless asked: `--with-peers` installs ansible-core into a venv under
the bench's own temp folder, and the Debian packages the baselines need (inotify-tools,
entr, jq) with apt-get, saying so first. A baseline whose tool is missing is shown as such.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable


def opsrun_cmd() -> list[str]:
    exe = shutil.which("opsrun", path=str(Path(PY).parent))
    return [exe] if exe else [PY, "-m", "opsrun"]


@dataclass
class Row:
    figure: str
    opsrun: float | None
    unit: str
    baselines: dict[str, float | None] = field(default_factory=dict)
    goal: str = ""
    met: bool | None = None
    note: str = ""


def median_of(fn: Callable[[], float], repeat: int) -> float:
    return statistics.median(fn() for _ in range(repeat))


def wait_for(predicate: Callable[[], object], timeout: float = 60.0,
             interval: float = 0.002) -> object:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)  # polling a condition with a deadline, not waiting for an outcome
    raise TimeoutError("condition not met in time")


def timed_ms(argv: list[str], env: dict[str, str] | None = None, runs: int = 10) -> float:
    subprocess.run(argv, env=env, capture_output=True, check=False)  # warm the cache
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                       check=False)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


# ── a running service ───────────────────────────────────────────────────────

@contextmanager
def service(runbooks: Path, state: Path, *extra: str) -> Iterator[subprocess.Popen[str]]:
    env = {**os.environ, "OPSRUN_STATE_DIR": str(state)}
    p = subprocess.Popen([*opsrun_cmd(), "watch", "--runbooks", str(runbooks), *extra],
                         env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    assert p.stderr is not None
    for line in p.stderr:
        if "ready" in line:
            break
    else:
        raise RuntimeError("opsrun watch did not start")
    # Keep reading its log: a full pipe would stop the service at its next log line.
    threading.Thread(target=lambda: all(True for _ in p.stderr or ()), daemon=True).start()
    try:
        yield p
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()


def rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ── the figures ─────────────────────────────────────────────────────────────

def startup(tmp: Path, repeat: int, ansible: str | None) -> list[Row]:
    rb = tmp / "true.yaml"
    rb.write_text("steps:\n  - run: 'true'\n")
    # Compiled bytecode, as after a normal install: without it every start compiles opsrun.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update({"OPSRUN_STATE_DIR": str(tmp / "state-startup"), "NO_COLOR": "1"})
    runs = 5 if repeat == 1 else 15
    py = timed_ms([PY, "-c", "pass"], env, runs)
    bash = timed_ms(["bash", "-c", "true"], env, runs)
    help_ms = timed_ms([*opsrun_cmd(), "--help"], env, runs)
    run_ms = timed_ms([*opsrun_cmd(), "run", str(rb)], env, runs)
    ans = None
    if ansible:
        play = tmp / "play.yml"
        play.write_text("- hosts: localhost\n  gather_facts: false\n  connection: local\n"
                        "  tasks:\n    - command: 'true'\n")
        # The venv's own python: interpreter discovery would warn, or fail the task.
        argv = [ansible, "-i", "localhost,", "-e",
                f"ansible_python_interpreter={Path(ansible).parent / 'python'}", str(play)]
        check = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise RuntimeError("ansible-playbook failed:\n" + check.stdout + check.stderr)
        ans = timed_ms(argv, env, max(3, runs // 3))
    return [
        Row("start-up: `opsrun --help`", help_ms, "ms", {"python -c pass": py},
            "< 150 ms and ≤ 3× python", help_ms < 150 and help_ms <= 3 * py),
        Row("start-up: `opsrun run` of one `true` step", run_ms, "ms",
            {"bash -c true": bash, "ansible-playbook, one local `command: true`": ans},
            "≥ 10× faster than ansible-playbook",
            None if ans is None else ans >= 10 * run_ms,
            "" if ans else "ansible-playbook not measured: use --with-peers"),
    ]


def latency(tmp: Path, repeat: int) -> list[Row]:
    rounds = 8 if repeat == 1 else 20
    rbdir, watched, base_dir = tmp / "lat-rb", tmp / "lat-watched", tmp / "lat-base"
    for d in (rbdir, watched, base_dir):
        d.mkdir()
    target, base_target = watched / "file", base_dir / "file"
    target.write_text("0")
    base_target.write_text("0")
    stamps = {k: tmp / f"lat-{k}.ts" for k in ("file", "emit", "inotify", "entr")}
    (rbdir / "file.yaml").write_text(
        f'on: [{{file: {{paths: ["{target}"], events: [modified]}}}}]\n'
        "concurrency: {policy: parallel}\n"
        f"steps:\n  - run: date +%s%N >> {stamps['file']}\n")
    (rbdir / "emit.yaml").write_text(
        "on: [{event: {where: {kind: bench}}}]\nconcurrency: {policy: parallel}\n"
        f"steps:\n  - run: date +%s%N >> {stamps['emit']}\n")
    env = {**os.environ, "OPSRUN_STATE_DIR": str(tmp / "lat-state")}

    def count(p: Path) -> int:
        return len(p.read_text().split()) if p.exists() else 0

    def last(p: Path) -> float:
        return int(p.read_text().split()[-1]) / 1e9

    def through(path: Path, stamp: Path, n: int) -> list[float]:
        out = []
        for i in range(n):
            before = count(stamp)
            t0 = time.time()
            path.write_text(str(i))
            wait_for(lambda: count(stamp) > before, 30)
            out.append((last(stamp) - t0) * 1000)
            time.sleep(0.15)  # let the watchers settle before the next write
        return out

    rows: list[Row] = []
    peers: dict[str, float | None] = {}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if shutil.which("inotifywait"):
            procs.append(subprocess.Popen(
                ["bash", "-c", f"inotifywait -q -m -e close_write {base_target} | "
                               f"while read -r _; do date +%s%N >> {stamps['inotify']}; done"],
                start_new_session=True))
        if shutil.which("entr"):
            procs.append(subprocess.Popen(
                ["bash", "-c", f"echo {base_target} | entr -np sh -c "
                               f"'date +%s%N >> {stamps['entr']}'"],
                start_new_session=True, stdin=subprocess.PIPE))
        time.sleep(1.0)  # the baselines print nothing when their watches are up
        if shutil.which("inotifywait"):
            peers["inotifywait -m + bash"] = statistics.median(
                through(base_target, stamps["inotify"], rounds))
        else:
            peers["inotifywait -m + bash"] = None
        if shutil.which("entr"):
            # entr runs on both baselines' writes: count its own stamps only
            peers["entr"] = statistics.median(through(base_target, stamps["entr"], rounds))
        else:
            peers["entr"] = None
        with service(rbdir, tmp / "lat-state"):
            file_ms = statistics.median(through(target, stamps["file"], rounds))
            emit, after_return = [], []
            for i in range(rounds):
                before = count(stamps["emit"])
                t0 = time.time()
                subprocess.run([*opsrun_cmd(), "emit", json.dumps({"kind": "bench", "i": i})],
                               env=env, check=True, capture_output=True)
                returned = time.time()
                wait_for(lambda: count(stamps["emit"]) > before, 30)
                emit.append((last(stamps["emit"]) - t0) * 1000)
                # The step often starts before emit has exited: that is no wait at all.
                after_return.append(max(0.0, last(stamps["emit"]) - returned) * 1000)
            emit_ms = statistics.median(emit)
            returned_ms = statistics.median(after_return)
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
    base = peers.get("inotifywait -m + bash")
    rows.append(Row("event latency: file written → step started", file_ms, "ms", peers,
                    "median < 100 ms, ≤ 5× inotifywait + bash",
                    file_ms < 100 and (base is None or file_ms <= 5 * base),
                    "includes the default 50 ms debounce"))
    rows.append(Row("event latency: `opsrun emit` returned → step started", returned_ms, "ms",
                    {}, "< 100 ms", returned_ms < 100,
                    "0 when the step started before emit had exited"))
    rows.append(Row("event latency: `opsrun emit` started → step started", emit_ms, "ms",
                    {}, "", None, "includes the start-up of the emit command itself"))
    return rows


def log_throughput(tmp: Path, repeat: int, lines: int) -> list[Row]:
    log = tmp / "big.log"
    with log.open("w") as f:
        for n in range(lines):
            f.write(f"2026-11-22T10:00:{n % 60:02d}Z web-{n % 7} GET /api/item/{n} 200 "
                    f"{n % 997}ms user={n % 4000}\n")

    def grep(args: list[str]) -> float:
        t0 = time.perf_counter()
        subprocess.run(["grep", *args, str(log)], capture_output=True, check=False)
        return lines / (time.perf_counter() - t0)

    marked = tmp / "big-marked.log"
    with log.open("rb") as src, marked.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
        dst.write(b"BENCH-END\n")
    only_marker = tmp / "marker-only.log"
    only_marker.write_bytes(b"BENCH-END\n")

    def until_marker(path: Path, match: str, tag: str) -> float:
        """Seconds from starting `opsrun watch` to the run of the end marker's runbook."""
        rbdir = tmp / f"log-rb-{tag}-{time.monotonic_ns()}"
        rbdir.mkdir()
        stamp = rbdir / "end.ts"
        (rbdir / "tail.yaml").write_text(
            f"on: [{{log: {{path: {path}, match: '{match}', from: start}}}}]\n"
            "concurrency: {policy: parallel}\nsteps:\n  - run: 'true'\n")
        (rbdir / "end.yaml").write_text(
            f"on: [{{log: {{path: {path}, match: '^BENCH-END', from: start}}}}]\n"
            f"steps:\n  - run: date +%s%N > {stamp}\n")
        t0 = time.time()
        with service(rbdir, rbdir / "state"):
            wait_for(lambda: stamp.exists() and stamp.read_text().strip(), 600)
            return int(stamp.read_text()) / 1e9 - t0

    def through_watch(match: str, tag: str) -> float:
        # The same service on a log holding only the end marker gives the start-up time,
        # which is subtracted; the second trigger's reading of the file is not.
        full = until_marker(marked, match, tag)
        startup = until_marker(only_marker, match, tag + "-empty")
        return lines / max(1e-6, full - startup)

    nomatch = median_of(lambda: through_watch(r"FATAL \d+", "none"), repeat)
    match = median_of(lambda: through_watch(r"item/9999\d ", "some"), repeat)
    g = median_of(lambda: grep(["-c", "FATAL"]), repeat)
    ge = median_of(lambda: grep(["-cE", r"item/9999[0-9] "]), repeat)
    return [
        Row(f"log throughput, regex matching nothing ({lines:,} lines)", nomatch, "lines/s",
            {"grep -c": g}, "≥ ⅓ of grep -c", nomatch >= g / 3,
            "through `opsrun watch`, start-up subtracted; a second trigger on the same "
            "file, for the end marker, reads it too"),
        Row("log throughput, regex matching 1 line in 10,000", match, "lines/s",
            {"grep -cE": ge}, "≥ ⅓ of grep -cE", match >= ge / 3,
            "each match starts a run (a `true` step)"),
    ]


def dispatch(tmp: Path, repeat: int, events: int) -> list[Row]:
    data = tmp / "events.jsonl"
    with data.open("w") as f:
        for n in range(events):
            f.write(json.dumps({"type": "metric", "host": f"web-{n % 50}", "value": n,
                                "labels": {"env": "prod", "team": f"t{n % 9}"}}) + "\n")

    def jq() -> float:
        t0 = time.perf_counter()
        with data.open("rb") as f:
            subprocess.run(["jq", "-c", "."], stdin=f, stdout=subprocess.DEVNULL, check=True)
        return events / (time.perf_counter() - t0)

    empty = tmp / "no-events.jsonl"
    empty.write_text("")

    def once(rbdir: Path, source: Path) -> float:
        t0 = time.perf_counter()
        with source.open("rb") as f:
            subprocess.run([*opsrun_cmd(), "dispatch", "--dry-run", "--runbooks", str(rbdir)],
                           stdin=f, stdout=subprocess.DEVNULL, check=True)
        return time.perf_counter() - t0

    def ours(n: int) -> float:
        rbdir = tmp / f"dispatch-{n}"
        if not rbdir.exists():
            rbdir.mkdir()
            for i in range(n):
                (rbdir / f"r{i}.yaml").write_text(
                    f"on: [{{event: {{where: {{type: alert, alertname: A{i}}}}}}}]\n"
                    "steps:\n  - run: 'true'\n")
        # Per event: the time with the events minus the time to start and load the runbooks.
        return events / max(1e-6, once(rbdir, data) - once(rbdir, empty))

    base = median_of(jq, repeat) if shutil.which("jq") else None
    rates = {n: median_of(lambda n=n: ours(n), repeat) for n in (10, 100, 1000)}
    flat = rates[1000] >= 0.7 * rates[10]
    return [Row(f"dispatch --dry-run, {n:,} runbooks ({events:,} events)", rate, "events/s",
                {"jq -c .": base}, "flat from 10 to 1,000 runbooks", flat if n == 1000 else None,
                "start-up and loading the runbooks subtracted")
            for n, rate in rates.items()]


def audit(tmp: Path, repeat: int, records: int) -> list[Row]:
    sys.path.insert(0, str(HERE.parent))
    from opsrun.audit.log import AuditLog
    from opsrun.audit.verify import verify_log

    fields = {"run_id": "01JD5ZQ6W3Y8K0F4T1N2M7P9RS", "step": "restart", "exit_code": 0,
              "outcome": "success", "duration": 1.25, "stdout": "web.service restarted"}

    def rate(n: int, fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return n / (time.perf_counter() - t0)

    def durable() -> float:
        log = AuditLog(tmp / f"a-{time.monotonic_ns()}" / "audit.jsonl")
        return rate(500, lambda: log.append("step.finished", **fields))

    def grouped() -> float:
        log = AuditLog(tmp / f"g-{time.monotonic_ns()}" / "audit.jsonl")
        batch = [("step.finished", fields)] * 20
        return rate(100, lambda: log.append_many(batch)) * 20

    def unsynced() -> float:
        line = b'{"v":1,"seq":1,"kind":"step.finished"}' + b"x" * 300 + b"\n"
        fd = os.open(tmp / f"raw-{time.monotonic_ns()}", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            return rate(50_000, lambda: os.write(fd, line))
        finally:
            os.close(fd)

    folder = tmp / "verify"
    log = AuditLog(folder / "audit.jsonl")
    batch = [("step.finished", fields)] * 10_000
    for _ in range(records // len(batch)):
        log.append_many(batch)
    log.close()
    files = sorted(folder.glob("audit*.jsonl"))

    def verify() -> float:
        t0 = time.perf_counter()
        assert verify_log(folder / "audit.jsonl", from_start=True).ok
        return time.perf_counter() - t0

    def sha() -> float:
        t0 = time.perf_counter()
        subprocess.run(["sha256sum", *map(str, files)], check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0

    d, g, u = (median_of(f, repeat) for f in (durable, grouped, unsynced))
    v, s = median_of(verify, repeat), median_of(sha, repeat)
    per_million = v * 1_000_000 / records
    return [
        Row("audit: durable appends (fsync each)", d, "records/s", {"unsynced append": u},
            "", None),
        Row("audit: durable appends, group commit of 20", g, "records/s",
            {"unsynced append": u}, "≥ 2,000/s", g >= 2000),
        Row(f"audit: verify {records:,} records", v, "s", {"sha256sum": s},
            "1,000,000 in < 10 s", per_million < 10),
    ]


def memory(tmp: Path, quick: bool) -> list[Row]:
    def make(n: int, files: int) -> Path:
        rbdir = tmp / f"mem-{n}"
        rbdir.mkdir()
        watched = tmp / f"mem-files-{n}"
        watched.mkdir()
        per = max(1, files // max(1, n))
        for i in range(n):
            sub = watched / f"d{i}"
            sub.mkdir()
            for j in range(per):
                (sub / f"f{j}.txt").write_text("x")
            (rbdir / f"r{i}.yaml").write_text(
                f'on:\n  - file: {{paths: ["{sub}/*.txt"]}}\n'
                f"  - event: {{where: {{type: alert, alertname: M{i}}}}}\n"
                "steps:\n  - run: 'true'\n")
        return rbdir

    rows = []
    for n, files in ((10, 100), (1000, 10_000)):
        if quick and n == 1000:
            n, files = 200, 2000
        rbdir = make(n, files)
        with service(rbdir, rbdir / "state") as p:
            time.sleep(2.0)  # let it settle: this measures an idle service
            idle = rss_mb(p.pid)
            if n >= 200:
                count = 20_000 if quick else 100_000
                events = "".join(json.dumps({"type": "noise", "n": i}) + "\n"
                                 for i in range(count))
                subprocess.run([*opsrun_cmd(), "emit", "-"], input=events.encode(),
                               env={**os.environ, "OPSRUN_STATE_DIR": str(rbdir / "state")},
                               check=True, capture_output=True)
                state = rbdir / "state" / "state.db"
                import sqlite3

                def drained() -> bool:
                    with sqlite3.connect(f"file:{state}?mode=ro", uri=True) as c:
                        return c.execute("SELECT count(*) FROM event_queue").fetchone()[0] == 0
                wait_for(drained, 600, interval=0.5)
                after = rss_mb(p.pid)
                rows.append(Row(f"memory: watch RSS after {count:,} events ({n:,} runbooks)",
                                after, "MB", {"idle, same service": idle},
                                "flat (≤ idle + 20 MB)", after <= idle + 20))
        rows.append(Row(f"memory: watch RSS idle, {n:,} runbooks / {files:,} watched files",
                        idle, "MB", {}, "< 80 MB", idle < 80))
    return rows


def flow(tmp: Path, repeat: int) -> list[Row]:
    sys.path.insert(0, str(HERE))
    import flow as flow_bench  # bench/flow.py

    figures = flow_bench.measure(tmp / "flow", 16, max(3, repeat))
    bash_median, _bash_max = figures["bash"]
    rows = []
    for kind, label in (("parallel", "parallel: branch start gap (16)"),
                        ("for_each", "for_each: item start gap (16)")):
        median, largest = figures[kind]
        rows.append(Row(label, median, "ms", {"bash &": bash_median},
                        f"< {flow_bench.GOAL_MS:g} ms", median < flow_bench.GOAL_MS,
                        f"largest gap {largest:.1f} ms"))
    return rows


def webhook(tmp: Path, repeat: int, quick: bool) -> list[Row]:
    sys.path.insert(0, str(HERE))
    import webhook as webhook_bench  # bench/webhook.py

    requests = 1000 if quick else 4000
    runs = [webhook_bench.measure(tmp / f"webhook-{n}", 8, requests, 30.0)
            for n in range(repeat)]

    def med(name: str, i: int) -> float:
        return statistics.median(r[name][i] for r in runs)

    failed = sum(r["opsrun"][3] for r in runs)
    return [
        Row("webhook: 202 answers/s, 8 clients on 127.0.0.1", med("opsrun", 0), "requests/s",
            {"http.server answering 202, no queue": med("baseline", 0)}, "", None,
            f"each 202 after the token check and the queue write; {failed} not 202"),
        Row("webhook: p50 latency of a 202", med("opsrun", 1), "ms",
            {"http.server answering 202, no queue": med("baseline", 1)}, "", None),
        Row("webhook: p99 latency of a 202", med("opsrun", 2), "ms",
            {"http.server answering 202, no queue": med("baseline", 2)}, "< 100 ms",
            med("opsrun", 2) < 100),
    ]


def ssh_fanout(tmp: Path, repeat: int) -> list[Row]:
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    import ssh as ssh_bench  # bench/ssh.py

    server = ssh_bench.start_sshd(tmp / "sshd")
    try:
        got = dict(ssh_bench.measure(server, tmp / "ssh", 20, max(3, repeat)))
    finally:
        server.stop()
    ms = {k: v * 1000 for k, v in got.items()}
    return [
        Row("SSH: one `true` step on 1 host (whole command)", ms["opsrun, one host"], "ms",
            {"ssh host true": ms["OpenSSH, one `ssh host true`"]}, "", None,
            "each run connects afresh, like each ssh"),
        Row("SSH fan-out: one `true` step on 20 hosts, parallel: 20",
            ms["opsrun, 20 hosts, parallel: 20"], "ms",
            {"20 × ssh host true, xargs -P 20": ms["OpenSSH, 20 x `ssh host true`, xargs -P 20"],
             "opsrun, parallel: 1": ms["opsrun, 20 hosts, parallel: 1"]},
            "well under parallel: 1",
            ms["opsrun, 20 hosts, parallel: 20"] < 0.7 * ms["opsrun, 20 hosts, parallel: 1"]),
    ]


# ── peers, the table, the machine ──────────────────────────────────────────

def install_peers(tmp: Path) -> str | None:
    missing = [p for p, exe in (("inotify-tools", "inotifywait"), ("entr", "entr"),
                                ("jq", "jq")) if shutil.which(exe) is None]
    if missing:
        print(f"--with-peers: installing Debian packages {', '.join(missing)} with apt-get",
              file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=False,
                       stdout=subprocess.DEVNULL)
    venv = tmp / "peers"
    print(f"--with-peers: installing ansible-core into {venv}", file=sys.stderr)
    subprocess.run([PY, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "ansible-core"], check=True)
    return str(venv / "bin" / "ansible-playbook")


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.system()} {platform.release()}, {os.cpu_count()} cores ({cpu}), "
            f"{mem:.0f} GiB RAM, Python {platform.python_version()}")


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit in ("lines/s", "events/s", "records/s", "requests/s"):
        return f"{value:,.0f} {unit}"
    return f"{value:,.1f} {unit}" if value < 100 else f"{value:,.0f} {unit}"


def table(rows: list[Row]) -> str:
    out = ["| figure | opsrun | baselines in the same run | ratio | goal |",
           "|---|---|---|---|---|"]
    for r in rows:
        bases = "; ".join(f"{k}: {fmt(v, r.unit)}" for k, v in r.baselines.items()) or "—"
        first = next((v for v in r.baselines.values() if v), None)
        ratio = f"{r.opsrun / first:.2f}×" if r.opsrun and first else "—"
        verdict = {True: "met", False: "**missed**", None: ""}[r.met]
        goal = f"{r.goal} — {verdict}" if r.goal else verdict
        note = f" ({r.note})" if r.note else ""
        out.append(f"| {r.figure}{note} | {fmt(r.opsrun, r.unit)} | {bases} | {ratio} | "
                   f"{goal} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, one repetition")
    ap.add_argument("--with-peers", action="store_true",
                    help="install ansible-core (temp venv) and inotify-tools, entr, jq")
    ap.add_argument("--repeat", type=int, help="repetitions of each figure (default 3)")
    ap.add_argument("--only", help="comma-separated: startup,latency,log,dispatch,audit,ssh,"
                                     "flow,webhook,memory")
    args = ap.parse_args()
    repeat = args.repeat or (1 if args.quick else 3)
    tmp = Path(tempfile.mkdtemp(prefix="opsrun-bench-"))
    only = set(args.only.split(",")) if args.only else None
    rows: list[Row] = []
    try:
        ansible = install_peers(tmp) if args.with_peers else shutil.which("ansible-playbook")
        parts: list[tuple[str, Callable[[], list[Row]]]] = [
            ("startup", lambda: startup(tmp, repeat, ansible)),
            ("latency", lambda: latency(tmp, repeat)),
            ("log", lambda: log_throughput(tmp, repeat, 200_000 if args.quick else 1_000_000)),
            ("dispatch", lambda: dispatch(tmp, repeat, 20_000 if args.quick else 100_000)),
            ("audit", lambda: audit(tmp, repeat, 100_000 if args.quick else 1_000_000)),
            ("ssh", lambda: ssh_fanout(tmp, repeat)),
            ("flow", lambda: flow(tmp, repeat)),
            ("webhook", lambda: webhook(tmp, repeat, args.quick)),
            ("memory", lambda: memory(tmp, args.quick)),
        ]
        for name, fn in parts:
            if only and name not in only:
                continue
            print(f"measuring {name} …", file=sys.stderr, flush=True)
            try:
                rows += fn()
            except Exception as e:  # noqa: BLE001 - one broken figure must not lose the rest
                print(f"  {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
                rows.append(Row(name, None, "", {}, "", None,
                                f"failed: {type(e).__name__}: {e}"[:200]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = table(rows)
    print(text)
    if only:
        return 0  # a partial table is printed, never written over the full one
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mode = " (--quick)" if args.quick else ""
    (HERE / "RESULTS.md").write_text(
        f"# opsrun benchmark results\n\n{stamp}{mode}, measured by `python bench/run.py"
        f"{' --quick' if args.quick else ''}` on: {machine()}.\n\n"
        f"Each figure is the median of {repeat} measurement(s); the baselines were measured "
        "in the same run.\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
