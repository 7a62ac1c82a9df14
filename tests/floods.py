"""Floods through the real program: JSON events through `dispatch` and `emit`, a burst of
log lines, a thousand files at once. Each scenario checks that nothing was lost (or done
twice) from the outside, and measures the time and the peak RSS of the process that took
the flood (`VmHWM` of `opsrun watch`, `ru_maxrss` of `opsrun dispatch`).

tests/test_floods.py runs them at sizes the suite can afford; bench/floods.py (or
OPSRUN_FLOODS=full for the tests) at the sizes of the issue.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.helpers.cli import command  # noqa: E402
from tests.helpers.service import Service  # noqa: E402
from tests.helpers.wait import wait_for  # noqa: E402

RSS_LIMIT_MB = 200
SAMPLE_EVERY = 100  # one event in this many starts a real run in the event floods
FULL = {"dispatch": 100_000, "dispatch_runs": 100_000, "emit": 100_000, "log": 50_000,
        "files": 1_000}
SUITE = {"dispatch": 100_000, "dispatch_runs": 20_000, "emit": 20_000, "log": 50_000,
         "files": 1_000}
_NO_MATCH = re.compile(r"event matched no runbook event_id=(\S+)")


@dataclass
class Figure:
    """What one flood measured."""

    name: str
    count: int
    seconds: float
    peak_rss_mb: float
    notes: dict[str, object] = field(default_factory=dict)

    def line(self) -> str:
        extra = "".join(f", {k} {v}" for k, v in self.notes.items())
        return (f"{self.name}: {self.count:,} in {self.seconds:.1f} s "
                f"({self.count / max(self.seconds, 1e-9):,.0f}/s), peak RSS "
                f"{self.peak_rss_mb:.0f} MB{extra}")


# ── plumbing ────────────────────────────────────────────────────────────────

def write_runbook(folder: Path, name: str, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(textwrap.dedent(text))


def marker_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def vm_hwm_mb(pid: int) -> float:
    """The peak resident set of a live process, from /proc (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def run_measured(argv: Sequence[str], stdin: bytes, env: dict[str, str],
                 out: Path) -> tuple[int, float, float]:
    """Run a command with `stdin`, stdout to `out`; return (exit code, seconds, peak RSS
    in MB of that process, from wait4)."""
    t0 = time.monotonic()
    peak_file = out.with_suffix(".peak")
    with open(out, "wb") as sink, open(out.with_suffix(".err"), "wb") as err:
        p = subprocess.Popen([sys.executable, "-c", _PEAK_OF_CHILD, str(peak_file), *argv],
                             stdin=subprocess.PIPE, stdout=sink, stderr=err,
                             env={**os.environ, **env})
        assert p.stdin is not None

        def feed() -> None:
            assert p.stdin is not None
            try:
                p.stdin.write(stdin)
            finally:
                p.stdin.close()

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        p.wait()
        feeder.join(timeout=10)
    return p.returncode, time.monotonic() - t0, int(peak_file.read_text()) / 1024


# The kernel starts a new program's peak RSS at the peak of the process that made it (exec
# keeps the old high-water mark), so a command started straight from a big pytest worker
# would report the worker's size. A small Python in between starts it and reads its own
# child's peak from wait4.
_PEAK_OF_CHILD = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


@contextmanager
def service(work: Path, runbooks: Path, *extra: str) -> Iterator[Service]:
    svc = Service(work, runbooks, *extra)
    try:
        svc.start()
        yield svc
    finally:
        svc.close()


def settled(svc: Service) -> bool:
    r = svc.cli("status", "--json")
    if r.returncode != 0:
        return False
    s = json.loads(r.stdout)
    return s["event_queue"] == 0 and s["runs_running"] == 0 and s["runs_queued"] == 0


def left_behind(svc: Service) -> list[str]:
    """Files a settled service should not keep: a lock file per ended run."""
    return sorted(p.name for p in (svc.state / "runs").glob("*.lock"))


def check_rss(figure: Figure) -> Figure:
    assert figure.peak_rss_mb < RSS_LIMIT_MB, figure.line()
    return figure


# ── the floods ──────────────────────────────────────────────────────────────

def dispatch_dry_run(work: Path, count: int) -> Figure:
    """`count` events through `opsrun dispatch --dry-run --json`: each answered once,
    with the runbooks it matches."""
    rb = work / "runbooks"
    for kind in ("alpha", "beta", "gamma"):
        write_runbook(rb, f"{kind}.yaml", f"""\
            on: [{{event: {{where: {{kind: {kind}}}}}}}]
            steps:
              - run: "true"
            """)
    kinds = ("alpha", "beta", "gamma", "nothing")
    data = "".join(json.dumps({"kind": kinds[n % 4], "id": f"d{n}"}) + "\n"
                   for n in range(count)).encode()
    code, seconds, rss = run_measured(
        command("dispatch", "--dry-run", "--json", "--runbooks", str(rb)), data,
        {"OPSRUN_STATE_DIR": str(work / "state")}, work / "dry.out")
    assert code == 0, (work / "dry.err").read_text()
    seen: dict[str, list[str]] = {}
    for line in (work / "dry.out").read_text().splitlines():
        doc = json.loads(line)
        assert doc["event_id"] not in seen, f"event {doc['event_id']} answered twice"
        seen[doc["event_id"]] = doc["runbooks"]
    assert len(seen) == count, f"{len(seen)} of {count} events answered"
    for n in (0, 1, 2, 3, count - 1):
        kind = kinds[n % 4]
        assert seen[f"d{n}"] == ([] if kind == "nothing" else [kind])
    return check_rss(Figure("dispatch --dry-run", count, seconds, rss))


def dispatch_runs(work: Path, count: int) -> Figure:
    """`count` events through `opsrun dispatch` (real runs): one in SAMPLE_EVERY matches a
    runbook, whose run records the event; every one of those runs once, in order."""
    rb, marks = work / "runbooks", work / "marks"
    write_runbook(rb, "sample.yaml", f"""\
        on: [{{event: {{where: {{sample: true}}}}}}]
        steps:
          - run: echo ${{{{ event.n }}}} >> {marks}
        """)
    data = "".join(json.dumps({"kind": "flow", "n": n, "sample": n % SAMPLE_EVERY == 0})
                   + "\n" for n in range(count)).encode()
    code, seconds, rss = run_measured(
        command("dispatch", "--runbooks", str(rb)), data,
        {"OPSRUN_STATE_DIR": str(work / "state")}, work / "dispatch.out")
    assert code == 0, (work / "dispatch.err").read_text()[-2000:]
    expected = [str(n) for n in range(0, count, SAMPLE_EVERY)]
    assert marker_lines(marks) == expected  # all, in order, none twice
    return check_rss(Figure("dispatch (real runs)", count, seconds, rss,
                            {"runs": len(expected)}))


def emit_drained(work: Path, count: int) -> Figure:
    """One `opsrun emit -` of `count` events to the running service, which drains them:
    one in SAMPLE_EVERY starts a run, the others match nothing; each is accounted for
    exactly once (a run, or the service's `event matched no runbook` line). The peak RSS
    of `opsrun emit` itself is bounded too (it sends batches as it reads)."""
    rb, marks = work / "runbooks", work / "marks"
    write_runbook(rb, "sample.yaml", f"""\
        on: [{{event: {{where: {{sample: true}}}}}}]
        concurrency: {{policy: parallel}}
        steps:
          - run: echo ${{{{ event.id }}}} >> {marks}
        """)
    data = "".join(json.dumps({"kind": "flow", "id": f"m{n}", "sample": n % SAMPLE_EVERY == 0})
                   + "\n" for n in range(count))
    with service(work, rb) as svc:
        assert svc.proc is not None
        t0 = time.monotonic()
        code, emitted, emit_rss = run_measured(command("emit", "-"), data.encode(), svc.env,
                                               work / "emit.out")
        assert code == 0, (work / "emit.err").read_text()
        assert f"queued {count} events for the running service" in \
            (work / "emit.out").read_text()
        wait_for(lambda: settled(svc), timeout=600, interval=0.25,
                 message=lambda: svc.log()[-2000:])
        seconds = time.monotonic() - t0
        rss = vm_hwm_mb(svc.proc.pid)
        assert left_behind(svc) == []
        assert svc.stop() == 0
        unmatched = Counter(_NO_MATCH.findall(svc.log()))
    ran = Counter(marker_lines(marks))
    sampled = {f"m{n}" for n in range(0, count, SAMPLE_EVERY)}
    assert set(ran) == sampled and max(ran.values()) == 1
    assert set(unmatched) == {f"m{n}" for n in range(count)} - sampled
    assert max(unmatched.values()) == 1
    assert emit_rss < RSS_LIMIT_MB, f"opsrun emit peaked at {emit_rss:.0f} MB"
    return check_rss(Figure("emit, drained by the service", count, seconds, rss,
                            {"emit took": f"{emitted:.1f} s",
                             "emit's peak RSS": f"{emit_rss:.0f} MB", "runs": len(sampled)}))


def log_burst(work: Path, count: int, *, every: int = 100) -> Figure:
    """`count` lines written at once to a followed log; one in `every` matches, and its run
    records the line's token and line number: all of them, each once, numbered right."""
    rb, marks, log = work / "runbooks", work / "marks", work / "app.log"
    log.write_text("")
    write_runbook(rb, "log.yaml", f"""\
        on: [{{log: {{path: {log}, match: 'HIT (?P<tok>\\d+)'}}}}]
        concurrency: {{policy: parallel}}
        steps:
          - run: echo ${{{{ event.tok }}}} ${{{{ event.lineno }}}} >> {marks}
        """)
    body = "".join(f"{n} {'HIT' if (n + 1) % every == 0 else 'line'} {n} "
                   f"{'x' * (n % 60)}\n" for n in range(count))
    with service(work, rb) as svc:
        assert svc.proc is not None
        t0 = time.monotonic()
        with log.open("a") as f:
            f.write(body)
        expected = {f"{n} {n + 1}" for n in range(count) if (n + 1) % every == 0}
        seconds, rss = until_all_ran(svc, marks, len(expected), t0)
    got = Counter(marker_lines(marks))
    assert set(got) == expected and max(got.values()) == 1
    return check_rss(Figure("log lines in one burst", count, seconds, rss,
                            {"runs": len(expected)}))


def until_all_ran(svc: Service, marks: Path, count: int, t0: float) -> tuple[float, float]:
    """Wait until `count` runs wrote their marker and the service is idle, then stop it:
    (seconds since t0, the service's peak RSS in MB); no lock file may be left."""
    assert svc.proc is not None
    wait_for(lambda: len(marker_lines(marks)) >= count and settled(svc),
             timeout=600, interval=0.25,
             message=lambda: f"{len(marker_lines(marks))} of {count} ran")
    seconds = time.monotonic() - t0
    rss = vm_hwm_mb(svc.proc.pid)
    assert left_behind(svc) == []
    assert svc.stop() == 0
    return seconds, rss


def files_at_once(work: Path, count: int) -> Figure:
    """`count` files created at once in a watched folder: each starts one run."""
    rb, marks, drop = work / "runbooks", work / "marks", work / "drop"
    drop.mkdir()
    write_runbook(rb, "files.yaml", f"""\
        on: [{{file: {{paths: ["{drop}/*.csv"], events: [added]}}}}]
        concurrency: {{policy: parallel}}
        steps:
          - run: echo ${{{{ event.path }}}} >> {marks}
        """)
    with service(work, rb) as svc:
        assert svc.proc is not None
        t0 = time.monotonic()
        for n in range(count):
            (drop / f"f{n}.csv").write_text(str(n))
        seconds, rss = until_all_ran(svc, marks, count, t0)
    got = Counter(marker_lines(marks))
    assert set(got) == {str(drop / f"f{n}.csv") for n in range(count)}
    assert max(got.values()) == 1
    return check_rss(Figure("files created at once", count, seconds, rss))


FLOODS = {"dispatch": dispatch_dry_run, "dispatch_runs": dispatch_runs,
          "emit": emit_drained, "log": log_burst, "files": files_at_once}


def in_temp(name: str, count: int) -> Figure:
    """Run one flood in a fresh temp folder."""
    with tempfile.TemporaryDirectory(prefix=f"opsrun-flood-{name}-") as tmp:
        return FLOODS[name](Path(tmp), count)
