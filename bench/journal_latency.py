"""Journal source latency: an entry written to a journal file → its event handed to emit.

    python bench/journal_latency.py [N]

Entries are written one at a time by systemd-journal-remote into a journal folder that a
JournalSource follows (`directory:`); the clock starts when journal-remote is started
(journalctl often prints the entry before journal-remote has exited, so its end is no
start line) and stops when the source's emit gets the event; journal-remote's own run
time is in both figures. The baseline is the
same measure for a bare `journalctl --follow --output json` read line by line, which is
the floor opsrun's source sits on (journalctl notices the file change through inotify).
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opsrun.event import Event  # noqa: E402
from opsrun.runbook import JournalTrigger  # noqa: E402
from opsrun.sources.journal import JournalSource  # noqa: E402
from opsrun.store import Store  # noqa: E402
from tests.helpers.journal import entry, journal_remote, write_entries  # noqa: E402


def measure_source(folder: Path, n: int) -> list[float]:
    got = threading.Event()
    at: list[float] = []

    def emit(events: Sequence[Event]) -> None:
        at.append(time.perf_counter())
        got.set()

    with Store.open(folder / "state") as store:
        trigger = JournalTrigger(("web.service",), 3, r"boom (?P<n>\d+)", (), "end",
                                 str(folder / "journal"))
        source = JournalSource("bench/journal/1", trigger, store)
        stop = threading.Event()
        thread = threading.Thread(target=source.run, args=(stop, emit), daemon=True)
        thread.start()
        source.ready.wait(30)
        out = []
        for i in range(n):
            got.clear()
            written = time.perf_counter()
            write_entries(folder / "journal", [entry(f"boom {i}", priority=3)])
            if not got.wait(10):
                raise SystemExit(f"entry {i} was not taken within 10 s")
            out.append(max(0.0, at[-1] - written))
        stop.set()
        thread.join(10)
    return out


def measure_journalctl(folder: Path, n: int) -> list[float]:
    p = subprocess.Popen(["journalctl", "--directory", str(folder / "journal"), "--merge",
                          "--output", "json", "--follow", "--lines", "0", "--quiet"],
                         stdout=subprocess.PIPE)
    assert p.stdout is not None
    lines: list[float] = []
    seen = threading.Condition()

    def read() -> None:
        assert p.stdout is not None
        for _ in p.stdout:
            with seen:
                lines.append(time.perf_counter())
                seen.notify_all()

    threading.Thread(target=read, daemon=True).start()
    # journalctl says nothing when it is ready: an entry it prints shows it is following.
    write_entries(folder / "journal", [entry("warm-up")])
    with seen:
        if not seen.wait_for(lambda: len(lines) > 0, timeout=10):
            raise SystemExit("journalctl did not print the warm-up entry within 10 s")
    out = []
    try:
        for i in range(n):
            before = len(lines)
            written = time.perf_counter()
            write_entries(folder / "journal", [entry(f"boom {i}", priority=3)])
            with seen:
                if not seen.wait_for(lambda: len(lines) > before, timeout=10):
                    raise SystemExit("journalctl did not print the entry within 10 s")
            out.append(max(0.0, lines[before] - written))
    finally:
        p.terminate()
        p.wait(10)
    return out


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    if journal_remote() is None:
        raise SystemExit("needs systemd-journal-remote (apt-get install systemd-journal-remote)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_entries(folder / "journal", [entry("start")])
        base = measure_journalctl(folder, n)
        ours = measure_source(folder, n)
    for name, values in (("journalctl --follow alone", base), ("opsrun journal source", ours)):
        values.sort()
        print(f"{name}: median {statistics.median(values) * 1000:.1f} ms, "
              f"p90 {values[int(len(values) * 0.9) - 1] * 1000:.1f} ms, "
              f"max {values[-1] * 1000:.1f} ms ({n} entries)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
