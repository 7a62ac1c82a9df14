"""Matching cost per event with 10, 100 and 1,000 runbooks, side by side.

Each runbook has an `event` trigger (`type: alert` and its own `service`), a `file`
trigger on its own folder and a `log` trigger on its own file; a few have conditions with
nothing literal to index by. The events match none, or exactly one, runbook.

    python bench/dispatch.py [--quick]
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opsrun.criteria import parse_where  # noqa: E402
from opsrun.event import Event, from_object, new_event  # noqa: E402
from opsrun.matcher import Matcher  # noqa: E402
from opsrun.runbook import EventTrigger, FileTrigger, LogTrigger, Runbook  # noqa: E402

SIZES = (10, 100, 1000)


def runbooks(n: int) -> list[Runbook]:
    """n runbooks with three triggers each, plus 3 that cannot be indexed."""
    books = []
    for i in range(n):
        triggers = (
            EventTrigger(parse_where({"type": "alert", "service": f"svc-{i}",
                                      "severity": {"in": ["critical", "high"]}})),
            FileTrigger((f"/srv/in-{i}/*.csv",), ("added", "modified"), 0.05, ()),
            LogTrigger(f"/var/log/app-{i}.log", r"ERROR (?P<code>\d+)", "end"),
        )
        books.append(Runbook(name=f"rb-{i}", path=Path(f"/rb/rb-{i}.yaml"), sha256="",
                             steps=(), triggers=triggers))
    for j in range(3):
        where = parse_where({"load": {"gt": 100 + j}})
        books.append(Runbook(name=f"scan-{j}", path=Path(f"/rb/scan-{j}.yaml"), sha256="",
                             steps=(), triggers=(EventTrigger(where),)))
    return books


def events(n: int) -> dict[str, tuple[Event, int]]:
    """Named events and how many runbooks each must start."""
    k = n // 2
    return {
        "json, none": (from_object({"type": "alert", "service": "svc-unknown",
                                    "severity": "high"}), 0),
        "json, one": (from_object({"type": "alert", "service": f"svc-{k}",
                                   "severity": "high"}), 1),
        "file, none": (new_event("file", path="/srv/elsewhere/a.csv", change="added"), 0),
        "file, one": (new_event("file", path=f"/srv/in-{k}/a.csv", change="added"), 1),
        "log, none": (new_event("log", path="/var/log/other.log", line="ERROR 1",
                                lineno=1), 0),
        "log, one": (new_event("log", path=f"/var/log/app-{k}.log", line="ERROR 7",
                               lineno=1), 1),
    }


def per_call_us(fn: Callable[[], object], seconds: float) -> float:
    """Best-of-5 time of one call, in microseconds."""
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds / 10:
        fn()
        calls += 1
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, rougher figures")
    args = parser.parse_args(argv)
    seconds = 0.1 if args.quick else 0.5
    results: dict[str, list[float]] = {}
    for n in SIZES:
        m = Matcher(runbooks(n))
        for name, (event, expected) in events(n).items():
            got = len(m.match(event))
            if got != expected:
                raise SystemExit(f"{name} with {n} runbooks started {got}, not {expected}")
            results.setdefault(name, []).append(per_call_us(lambda: m.match(event), seconds))
    print("matching cost per event (µs), runbooks with 3 triggers each + 3 unindexable")
    print(f"{'event':<12}" + "".join(f"{n:>10,}" for n in SIZES) + f"{'1000/10':>10}")
    for name, figures in results.items():
        ratio = figures[-1] / figures[0]
        print(f"{name:<12}" + "".join(f"{f:>10.2f}" for f in figures) + f"{ratio:>9.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
