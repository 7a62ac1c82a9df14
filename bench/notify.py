"""What notifications cost a run, and how fast the outbox delivers.

    python bench/notify.py [--quick]

- the time of a failing one-step run through the real engine and executors, without
  `notify:`, with three webhook targets, and with three targets whose webhook holds every
  answer back (a slow receiver): queueing is one store write, so the three should match;
- the outbox delivering N notifications to a webhook on 127.0.0.1 (stdlib http.server):
  notifications per second, each attempt audited.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opsrun import run_types as rt  # noqa: E402
from opsrun.engine import RunRequest  # noqa: E402
from opsrun.event import new_event  # noqa: E402
from opsrun.identity import Identity  # noqa: E402
from opsrun.notify.outbox import Outbox  # noqa: E402
from opsrun.notify.targets import Target  # noqa: E402
from opsrun.params import resolve  # noqa: E402
from opsrun.runbook import load_runbook_bytes  # noqa: E402
from opsrun.runs.context import open_run_context  # noqa: E402
from tests.helpers.receiver import Receiver  # noqa: E402


def run_times(runs: int, url: str | None, folder: Path) -> list[float]:
    notify = "" if url is None else "notify:\n" + "".join(
        f"  - webhook: {url}/{i}\n    on: [failed]\n" for i in range(3))
    rb = load_runbook_bytes(f"steps:\n  - run: exit 3\n{notify}".encode(), folder / "rb.yaml")
    times = []
    with open_run_context(str(folder / "state"), None, {}) as rc:
        outbox = Outbox(rc.store, rc.audit, {}) if url else None
        if outbox is not None:
            rc.outbox = outbox.start()
        engine = rc.engine([], confirmer=None)
        for _ in range(runs):
            run_id = rc.store.create_run(rb.name, event={}, params={}, started_by="b",
                                         started_uid=0, state=rt.QUEUED).id
            t0 = time.perf_counter()
            result = engine.run(RunRequest(rb, run_id, new_event("manual"),
                                           resolve(rb.params, {}), Identity("b", 0)))
            times.append(time.perf_counter() - t0)
            assert result.state == rt.FAILED
        if outbox is not None:
            outbox.stop(timeout_s=0.1)
    return times


def delivery(n: int, folder: Path) -> float:
    with Receiver() as rx, open_run_context(str(folder / "state"), None, {}) as rc:
        target = Target("webhook", rx.url, timeout_s=5.0).as_record()
        t0 = time.time()
        rc.store.queue_notifications([{"run_id": None, "event": "failed", "target": target,
                                       "message": {"text": f"n{i}", "event": "failed",
                                                   "i": i}, "due_at": t0}
                                      for i in range(n)])
        outbox = Outbox(rc.store, rc.audit, {}, poll_s=0.01).start()
        while len(rx.requests) < n:
            time.sleep(0.01)
        elapsed = time.time() - t0
        outbox.stop()
        sent = rc.audit.path.read_text().count('"kind":"notify.sent"')
        assert sent == n, sent
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    runs, n = (50, 200) if args.quick else (200, 1000)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "a").mkdir()
        (folder / "b").mkdir()
        (folder / "c").mkdir()
        (folder / "d").mkdir()
        plain = run_times(runs, None, folder / "a")
        with Receiver() as rx:
            notified = run_times(runs, rx.url, folder / "b")
        with Receiver(hold=True) as slow:
            held = run_times(runs, slow.url, folder / "c")
        print(f"failing run, median of {runs}:")
        for name, times in (("no notify", plain), ("3 webhook targets", notified),
                            ("3 targets, webhook holds answers", held)):
            print(f"  {name:34} {statistics.median(times) * 1000:7.2f} ms   "
                  f"p99 {sorted(times)[int(len(times) * 0.99) - 1] * 1000:7.2f} ms")
        elapsed = delivery(n, folder / "d")
        print(f"outbox: {n} notifications delivered in {elapsed:.2f} s "
              f"({n / elapsed:.0f}/s, 4 workers, one attempt each, all audited)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
