"""Crash safety: SIGKILL `opsrun watch` at random moments while events flow in, then check.

    python tests/chaos.py [--iterations N] [--seed S] [--long] [--keep DIR]

Each iteration starts the real `opsrun watch` (a subprocess with an sd_notify socket),
lets events flow in — `opsrun emit` (a real CLI process, racing the service's start and
its death), lines appended to a followed log, files dropped in a watched folder, now and
then an `opsrun approve` — and kills it with SIGKILL at a moment the seeded RNG picks:
a random delay after the process was started (often before READY, during recovery),
after READY, or after it started N more steps. The delay is the fault injection, not a
wait for an outcome; every choice comes from `random.Random(seed)`, so a seed replays
the same plan (the moments are as exact as a busy machine lets them be).

Every step of every runbook appends `<run id> <begin|done> <token>` to one markers file
(`>>` is O_APPEND: lines never interleave). At the end the service runs once more until
it is idle, and the driver checks from the outside:

- `opsrun audit verify` passes, and `opsrun watch` stops cleanly on SIGTERM;
- every emitted event started exactly one run (the emit queue hands each event over
  once), every log line and every dropped file exactly one (a source's position is
  stored with the runs it starts: a restart neither repeats nor loses one, also a file
  dropped while the service was down or still being debounced at the kill), and every
  `opsrun emit` call succeeded, wherever the kill caught it;
- no run ran twice: no run id has two `begin` or two `done` markers; every succeeded
  run has exactly one `done`;
- nothing is left `running` or `queued`; every run the audit log saw start and not
  finish is `interrupted` (with a `run.interrupted` record) or `waiting`;
- every run waiting for an approval is still listed by `opsrun pending`, and one that is
  approved at the end goes on to finish, once.

The report counts the repeats and losses of each kind of input (`repeated_log_lines`,
`files_without_run`, …), so a regression shows as a number, not only as a problem line.
Before the first kill the service starts once and gets ready, so that the file source
has its first look at the folder (it reports changes from there on).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.helpers.cli import command  # noqa: E402
from tests.helpers.service import Service  # noqa: E402
from tests.helpers.wait import WaitTimeout, wait_for  # noqa: E402

DEFAULT_ITERATIONS = 200
LONG_ITERATIONS = 1000
KILLS = ("startup", "ready", "progress")


@dataclass
class Plan:
    """What one iteration does; drawn from the seeded RNG before anything runs."""

    emit: list[dict[str, object]]  # one `opsrun emit -` call, started with the service
    log_lines: list[str]
    files: list[str]
    kill: str  # startup | ready | progress
    delay_s: float
    steps: int  # for `progress`: kill after this many more steps ran
    approve: bool  # answer one waiting run while the service is up


@dataclass
class Tally:
    """What was sent in, and what happened, over all iterations."""

    emitted: list[str] = field(default_factory=list)  # tokens of emitted events
    asked: list[str] = field(default_factory=list)  # tokens of events whose run asks
    logged: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    kills: Counter[str] = field(default_factory=Counter)
    emit_failures: list[str] = field(default_factory=list)
    approved: list[str] = field(default_factory=list)
    killed_before_ready: int = 0


class Chaos:
    def __init__(self, work: Path, seed: int, iterations: int, scale: int = 1,
                 verbose: bool = False) -> None:
        self.work = work
        self.verbose = verbose
        self.rng = random.Random(seed)
        self.seed = seed
        self.iterations = iterations
        self.scale = scale
        self.markers = work / "markers"
        self.log = work / "app.log"
        self.drop = work / "drop"
        self.runbooks = work / "runbooks"
        self.tally = Tally()
        self.counter = 0
        self._markers_seen = 0
        self._markers_offset = 0
        self.emitters: list[subprocess.Popen[str]] = []

    # ── set-up ──────────────────────────────────────────────────────────────

    def setup(self) -> None:
        self.drop.mkdir(parents=True)
        self.runbooks.mkdir()
        self.log.write_text("")
        self.markers.write_text("")
        m = self.markers

        def two_steps(token: str, pause: str = "; sleep 0.05") -> str:
            # The pause gives kills a run in the middle to interrupt.
            return (f"  - run: echo \"$OPSRUN_RUN_ID begin {token}\" >> {m}{pause}\n"
                    f"  - run: echo \"$OPSRUN_RUN_ID done {token}\" >> {m}\n")

        (self.runbooks / "emit.yaml").write_text(
            "on: [{event: {where: {kind: chaos}}}]\nconcurrency: {policy: parallel}\n"
            "steps:\n" + two_steps("${{ event.n }}"))
        (self.runbooks / "serial.yaml").write_text(
            "on: [{event: {where: {kind: serial}}}]\nconcurrency: {policy: queue}\n"
            "steps:\n" + two_steps("${{ event.n }}", pause=""))
        (self.runbooks / "ask.yaml").write_text(textwrap.dedent(f"""\
            on: [{{event: {{where: {{kind: ask}}}}}}]
            concurrency: {{policy: parallel}}
            steps:
              - run: echo "$OPSRUN_RUN_ID begin ${{{{ event.n }}}}" >> {m}
              - id: ok
                confirm: "go on with ${{{{ event.n }}}}?"
              - run: echo "$OPSRUN_RUN_ID done ${{{{ event.n }}}}" >> {m}
            """))
        (self.runbooks / "log.yaml").write_text(
            f"on: [{{log: {{path: {self.log}, match: 'CHAOS (?P<tok>\\S+)', from: start}}}}]\n"
            "concurrency: {policy: parallel}\nsteps:\n" + two_steps("${{ event.tok }}"))
        (self.runbooks / "file.yaml").write_text(
            f"on: [{{file: {{paths: [\"{self.drop}/*.txt\"], events: [added]}}}}]\n"
            "concurrency: {policy: parallel}\nsteps:\n" + two_steps("${{ event.path }}"))

    # ── the plan ────────────────────────────────────────────────────────────

    def token(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def draw(self) -> Plan:
        rng = self.rng
        events: list[dict[str, object]] = []
        for _ in range(rng.choice((0, 0, 1, 3, 8, 15)) * self.scale):
            roll = rng.random()
            if roll < 0.06:
                t = self.token("a")
                self.tally.asked.append(t)
                events.append({"kind": "ask", "n": t})
            else:
                t = self.token("e")
                events.append({"kind": "serial" if roll < 0.3 else "chaos", "n": t})
            self.tally.emitted.append(str(events[-1]["n"]))
        lines = [self.token("l") for _ in range(rng.choice((0, 1, 4, 10)) * self.scale)]
        files = [self.token("f") for _ in range(rng.choice((0, 0, 1, 3)))]
        kill = rng.choice(KILLS)
        delay = {"startup": rng.uniform(0.05, 0.45), "ready": rng.uniform(0.0, 0.2),
                 "progress": rng.uniform(0.0, 0.02)}[kill]
        return Plan(events, lines, files, kill, delay, rng.randint(1, 10),
                    rng.random() < 0.05)

    # ── one iteration ───────────────────────────────────────────────────────

    def iteration(self, svc: Service, plan: Plan) -> None:
        svc.read_notify()
        svc.messages.clear()
        svc.start(wait_ready=False)
        started = time.monotonic()
        if plan.emit:
            # Not waited for here: an emit may outlive this service and meet the next one.
            self.emitters.append(self._emit(svc, plan.emit))
        half = len(plan.log_lines) // 2
        self._append_log(plan.log_lines[:half])
        if plan.kill == "startup":
            self._pause_until(started + plan.delay_s, svc)
        else:
            try:
                svc.wait_message("READY=1", timeout=30)
            except WaitTimeout:
                raise AssertionError("opsrun watch did not get ready:\n" + svc.log()[-3000:])
            self._drop_files(plan.files)
            self._append_log(plan.log_lines[half:])
            if plan.approve:
                self._approve_one(svc)
            if plan.kill == "progress":
                # At most as many steps as this iteration brought work for.
                work = 2 * (len(plan.emit) + len(plan.log_lines) + len(plan.files))
                target = self._steps() + min(plan.steps, work)
                try:
                    wait_for(lambda: self._steps() >= target, timeout=1)
                except WaitTimeout:
                    pass  # not that much work in flight: kill anyway
            self._pause_until(time.monotonic() + plan.delay_s, svc)
        svc.read_notify()
        if "READY=1" not in svc.messages:
            self.tally.killed_before_ready += 1
        if plan.kill == "startup":
            self._drop_files(plan.files)
            self._append_log(plan.log_lines[half:])
        svc.kill()
        self.tally.kills[plan.kill] += 1
        self._reap(wait=False)

    def _reap(self, *, wait: bool) -> None:
        for p in list(self.emitters):
            if not wait and p.poll() is None:
                continue
            _out, err = p.communicate(timeout=120)
            self.emitters.remove(p)
            if p.returncode != 0:
                self.tally.emit_failures.append(f"exit {p.returncode}: {err.strip()[-400:]}")

    def _pause_until(self, moment: float, svc: Service) -> None:
        # The fault injection: the moment of the kill, drawn from the seeded RNG. The
        # service may end on its own meanwhile, which is a failure worth reporting.
        remaining = moment - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
        assert svc.proc is not None
        if svc.proc.poll() is not None:
            raise AssertionError(f"opsrun watch exited by itself ({svc.proc.returncode}):\n"
                                 + svc.log()[-3000:])

    def _emit(self, svc: Service, events: list[dict[str, object]]) -> subprocess.Popen[str]:
        p = subprocess.Popen(command("emit", "-"), env={**os.environ, **svc.env},
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        assert p.stdin is not None
        p.stdin.write("".join(json.dumps(e) + "\n" for e in events))
        p.stdin.close()
        p.stdin = None  # communicate() must not flush the closed pipe again
        return p

    def _append_log(self, tokens: list[str]) -> None:
        if tokens:
            with self.log.open("a") as f:
                f.write("".join(f"{time.time():.6f} CHAOS {t} x\n" for t in tokens))
            self.tally.logged.extend(tokens)

    def _drop_files(self, names: list[str]) -> None:
        for name in names:
            (self.drop / f"{name}.txt").write_text(name)
            self.tally.dropped.append(str(self.drop / f"{name}.txt"))

    def _approve_one(self, svc: Service) -> None:
        r = svc.cli("pending", "--json")
        if r.returncode != 0:
            return
        pending = json.loads(r.stdout)["pending"]
        if pending:
            # The oldest, not a random one: what is pending depends on timing, and the
            # seeded RNG must draw the same plans whatever it was.
            run_id = min(p["run_id"] for p in pending)
            if svc.cli("approve", run_id).returncode == 0:
                self.tally.approved.append(run_id)

    def _steps(self) -> int:
        """How many steps have begun so far (each writes one marker line)."""
        with self.markers.open("rb") as f:
            f.seek(self._markers_offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._markers_offset += end
        self._markers_seen += data[:end].count(b"\n")
        return self._markers_seen

    # ── the whole run ───────────────────────────────────────────────────────

    def run(self) -> dict[str, object]:
        self.setup()
        t0 = time.monotonic()
        svc = Service(self.work, self.runbooks)
        # Read sd_notify without blocking: a READY is polled for, never waited out.
        svc.notify.setblocking(False)
        try:
            svc.start()  # the file source's first look; from here on nothing is missed
            svc.stop()
            for i in range(self.iterations):
                plan = self.draw()
                t = time.monotonic()
                self.iteration(svc, plan)
                if self.verbose:
                    print(f"[{i + 1}/{self.iterations}] kill at {plan.kill} "
                          f"+{plan.delay_s * 1000:.0f} ms, {len(plan.emit)} emitted, "
                          f"{time.monotonic() - t:.2f} s", file=sys.stderr)
            t = time.monotonic()
            report = self.finish(svc)
            report["final_settle_s"] = round(time.monotonic() - t, 1)
        finally:
            svc.close()
        report["seconds"] = round(time.monotonic() - t0, 1)
        return report

    def finish(self, svc: Service) -> dict[str, object]:
        """Start once more, let it settle, and check everything from the outside."""
        svc.read_notify()
        svc.messages.clear()
        svc.start()
        self._reap(wait=True)
        end = self.token("end")
        self._append_log([end])

        def idle() -> bool:
            if end not in self._markers_text():
                return False
            r = svc.cli("status", "--json")
            s = json.loads(r.stdout) if r.returncode == 0 else {}
            return (s.get("event_queue") == 0 and s.get("runs_running") == 0
                    and s.get("runs_queued") == 0)

        wait_for(idle, timeout=30, interval=0.2,
                 message=lambda: "the service did not settle:\n" + svc.log()[-3000:])
        runs = svc.runs()
        audit = svc.audit()
        problems = self.check(svc, runs, audit)
        approved_now = self._approve_at_end(svc, runs, problems)
        code = svc.stop()
        if code != 0:
            problems.append(f"opsrun watch exited {code} on SIGTERM")
        verify = svc.cli("audit", "verify")
        if verify.returncode != 0:
            problems.append(f"audit verify failed: {verify.stdout}{verify.stderr}")
        states = Counter(r["state"] for r in svc.runs())
        return {"seed": self.seed, "iterations": self.iterations,
                "kills": dict(self.tally.kills),
                "killed_before_ready": self.tally.killed_before_ready,
                "emitted": len(self.tally.emitted), "log_lines": len(self.tally.logged),
                "files": len(self.tally.dropped),
                "files_without_run": self._count(runs, self.tally.dropped, 0),
                "files_repeated": self._count(runs, self.tally.dropped, 2),
                "log_lines_without_run": self._count(runs, self.tally.logged, 0),
                "repeated_log_lines": self._count(runs, self.tally.logged, 2),
                "approved": len(self.tally.approved) + approved_now,
                "runs": sum(states.values()), "states": dict(states),
                "audit_records": len(audit), "problems": problems}

    def _markers_text(self) -> str:
        return self.markers.read_text()

    def check(self, svc: Service, runs: list[dict], audit: list[dict]) -> list[str]:
        problems: list[str] = []
        if self.tally.emit_failures:
            problems.append(f"{len(self.tally.emit_failures)} `opsrun emit` call(s) failed; "
                            f"first: {self.tally.emit_failures[0]}")
        by_token: dict[str, list[dict]] = {}
        for r in runs:
            ev = r.get("event") or {}
            token = ev.get("n") or ev.get("tok") or ev.get("path")
            by_token.setdefault(str(token), []).append(r)
        for t in self.tally.emitted:
            n = len(by_token.get(t, []))
            if n != 1:
                problems.append(f"emitted event {t} started {n} runs (expected exactly 1)")
        for t in self.tally.logged:
            n = len(by_token.get(t, []))
            if n != 1:
                problems.append(f"log line {t} started {n} runs (expected exactly 1)")
        for path in self.tally.dropped:
            n = len(by_token.get(path, []))
            if n != 1:
                problems.append(f"file {path} started {n} runs (expected exactly 1)")
        marks: Counter[tuple[str, str]] = Counter()
        for line in self._markers_text().splitlines():
            run_id, what, _token = line.split(" ", 2)
            marks[(run_id, what)] += 1
        for (run_id, what), n in marks.items():
            if n > 1:
                problems.append(f"run {run_id} ran its {what!r} step {n} times")
        started = {r["run_id"] for r in audit if r["kind"] == "run.started"}
        finished = {r["run_id"]: r["state"] for r in audit if r["kind"] == "run.finished"}
        interrupted = {r["run_id"] for r in audit if r["kind"] == "run.interrupted"}
        for r in runs:
            rid, state = r["id"], r["state"]
            if state in ("running", "queued"):
                problems.append(f"run {rid} is left {state}")
            if state == "succeeded" and marks[(rid, "done")] != 1:
                problems.append(f"run {rid} succeeded with {marks[(rid, 'done')]} 'done' marks")
            if state == "interrupted" and rid not in interrupted:
                problems.append(f"run {rid} is interrupted without a run.interrupted record")
            if rid in started and rid not in finished and state not in ("interrupted",
                                                                        "waiting"):
                problems.append(f"run {rid} started, never finished, and is {state}")
            if rid in finished and finished[rid] != state:
                problems.append(f"run {rid} is {state} in the store, but the audit log says "
                                f"it finished {finished[rid]}")
        waiting = {r["id"] for r in runs if r["state"] == "waiting"}
        r = svc.cli("pending", "--json")
        pending = {p["run_id"] for p in json.loads(r.stdout)["pending"]} if \
            r.returncode == 0 else set()
        if waiting != pending:
            problems.append(f"waiting runs {sorted(waiting - pending)} are not pending; "
                            f"pending {sorted(pending - waiting)} are not waiting")
        for rid in self.tally.approved:
            state = next((x["state"] for x in runs if x["id"] == rid), None)
            if state == "waiting":
                problems.append(f"run {rid} was approved but still waits")
        return problems

    def _approve_at_end(self, svc: Service, runs: list[dict], problems: list[str]) -> int:
        waiting = sorted(r["id"] for r in runs if r["state"] == "waiting")
        chosen = waiting[:3]
        for rid in chosen:
            r = svc.cli("approve", rid)
            if r.returncode != 0:
                problems.append(f"approve {rid} failed: {r.stderr.strip()}")
        try:
            wait_for(lambda: all(f"{rid} done " in self._markers_text() for rid in chosen),
                     timeout=30)
        except WaitTimeout:
            problems.append(f"approved runs {chosen} did not finish")
        return len(chosen)

    @staticmethod
    def _count(runs: list[dict], tokens: list[str], runs_each: int) -> int:
        """How many tokens started no run (runs_each=0), or more than one (2)."""
        started: Counter[str] = Counter()
        for r in runs:
            ev = r.get("event") or {}
            started[str(ev.get("tok") or ev.get("path"))] += 1
        if runs_each == 0:
            return sum(1 for t in tokens if started[t] == 0)
        return sum(1 for t in tokens if started[t] >= 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=None,
                    help=f"kills and restarts (default {DEFAULT_ITERATIONS}; "
                         f"{LONG_ITERATIONS} with --long)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--long", action="store_true",
                    help="more iterations and three times the events per iteration")
    ap.add_argument("--verbose", action="store_true", help="one line per iteration on stderr")
    ap.add_argument("--keep", type=Path, default=None,
                    help="work in this (new) folder and keep it, to look at afterwards")
    args = ap.parse_args(argv)
    iterations = args.iterations or (LONG_ITERATIONS if args.long else DEFAULT_ITERATIONS)
    report = run_chaos(iterations, args.seed, scale=3 if args.long else 1, keep=args.keep,
                       verbose=args.verbose)
    print(json.dumps(report, indent=2))
    return 1 if report["problems"] else 0


def run_chaos(iterations: int, seed: int, *, scale: int = 1, keep: Path | None = None,
              verbose: bool = False) -> dict[str, object]:
    """Run the chaos driver in a fresh folder; return its report (problems empty = pass)."""
    # No test may touch the real home or state folder (as tests/conftest.py ensures).
    for var in ("OPSRUN_STATE_DIR", "STATE_DIRECTORY", "NOTIFY_SOCKET", "WATCHDOG_USEC"):
        os.environ.pop(var, None)
    if keep is not None:
        keep.mkdir(parents=True)
        return Chaos(keep.resolve(), seed, iterations, scale, verbose).run()
    with tempfile.TemporaryDirectory(prefix="opsrun-chaos-") as tmp:
        return Chaos(Path(tmp), seed, iterations, scale, verbose).run()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise SystemExit(main())
