"""Lines per second through the log source, beside grep on the same file in the same run.

Writes a log of 1,000,000 lines (~90 bytes each, 10% of them ERROR lines), then reads it
from the start through LogSource (a real state store, positions committed as in service)
with each regex, and counts the same lines with `grep -c` / `grep -cE`.

    python bench/logtail.py [--quick] [--lines N]
"""
from __future__ import annotations

import argparse
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opsrun.event import Event  # noqa: E402
from opsrun.runbook import LogTrigger  # noqa: E402
from opsrun.sources.logtail import LineMatcher, LogSource  # noqa: E402
from opsrun.store import Store  # noqa: E402

# name, Python regex, grep arguments for the same lines
CASES = [
    ("no match, a literal", r"Out of memory: Killed process \d+ \((?P<proc>[\w-]+)\)",
     ["-cE", r"Out of memory: Killed process [0-9]+ \([[:alnum:]_-]+\)"]),
    ("no match, (?i) literal", r"(?i)segfault at (?P<addr>[0-9a-f]+)",
     ["-ciE", r"segfault at [0-9a-f]+"]),
    ("no match, no literal", r"\bu(?P<uid>\d{5,})\b", ["-cE", r"\bu[0-9]{5,}\b"]),
    ("no match, lookbehind", r"(?<=user )u(?P<uid>\d{5,})", ["-cP", r"(?<=user )u\d{5,}"]),
    ("10% match, with groups", r"ERROR \[(?P<mod>\w+)\] (?P<msg>.*)",
     ["-cE", r"ERROR \[[[:alnum:]_]+\] .*"]),
    ("every line (no match:)", None, ["-c", ""]),
]
MODULES = ["db", "http", "auth", "cache", "queue", "sched"]


def write_log(path: Path, lines: int) -> None:
    rnd = random.Random(42)
    with path.open("w") as out:
        for i in range(lines):
            level = "ERROR" if i % 10 == 0 else rnd.choice(["INFO", "INFO", "DEBUG", "WARN"])
            out.write(f"2024-05-01T12:{i // 60000 % 60:02d}:{i // 1000 % 60:02d}.{i % 1000:03d}Z "
                      f"{level} [{rnd.choice(MODULES)}] request {i} took "
                      f"{rnd.randint(1, 999)} ms for user u{rnd.randint(1, 9999)}\n")


def through_source(log: Path, state: Path, match: str | None) -> tuple[float, int]:
    """Seconds to read the whole file through LogSource, and the events it made."""
    count = 0

    def emit(events: Sequence[Event]) -> None:
        nonlocal count
        count += len(events)

    with Store.open(state) as store:
        source = LogSource([("bench/log/x", LogTrigger(str(log), match, "start"))], store)
        start = time.perf_counter()
        while source.poll(emit):
            pass
        source.commit()
        elapsed = time.perf_counter() - start
        source.close()
    return elapsed, count


def through_grep(log: Path, args: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run(["grep", *args, str(log)], capture_output=True, text=True,
                          env={"LC_ALL": "C"})
    return time.perf_counter() - start, int(done.stdout.strip() or 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200,000 lines, one run each")
    parser.add_argument("--lines", type=int, default=None)
    args = parser.parse_args(argv)
    lines = args.lines or (200_000 if args.quick else 1_000_000)
    runs = 1 if args.quick else 3
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "app.log"
        write_log(log, lines)
        size = log.stat().st_size
        print(f"{lines:,} lines, {size / 1e6:.1f} MB; best of {runs}")
        print(f"{'regex':<28}{'opsrun lines/s':>16}{'events':>10}{'grep lines/s':>15}"
              f"{'grep count':>12}{'strategy':>10}")
        for case, (name, match, grep_args) in enumerate(CASES):
            ours = min((through_source(log, Path(tmp) / f"state-{case}-{i}", match)
                        for i in range(runs)), key=lambda r: r[0])
            theirs = min((through_grep(log, grep_args) for _ in range(runs)),
                         key=lambda r: r[0])
            strategy = LineMatcher(re.compile(match) if match else None).strategy
            print(f"{name:<28}{lines / ours[0]:>16,.0f}{ours[1]:>10,}"
                  f"{lines / theirs[0]:>15,.0f}{theirs[1]:>12,}"
                  f"{strategy:>10}")
            if ours[1] != theirs[1]:
                print(f"  !! opsrun found {ours[1]:,} lines, grep {theirs[1]:,}")
                return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
