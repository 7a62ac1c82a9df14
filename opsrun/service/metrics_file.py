"""Metrics gathered from the state store and the service, and the textfile that keeps them.

`collect` reads a Snapshot (opsrun.metrics turns it into text): run counts, step durations,
the queue, the oldest open question and the audit head come from the store, so they are
right whether the service runs or not; source health comes from the service's status.

`MetricsFileWriter` is the thread of `opsrun watch --metrics-file PATH`: every interval it
writes the exposition to a temporary file in PATH's folder, fsyncs it and renames it over
PATH, so that node_exporter's textfile collector never reads half a file. A failed write
is logged and tried again at the next interval; it never stops the service.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from opsrun import metrics
from opsrun.errors import UsageError
from opsrun.store import Store

Log = Callable[..., None]  # log(message, level=…, **fields)
DEFAULT_INTERVAL_S = 15.0
MIN_INTERVAL_S = 0.1
FILE_MODE = 0o644  # node_exporter runs as its own user and must read the file


def collect(store: Store | None, audit_log: Path, status: Mapping[str, Any] | None, *,
            now: datetime | None = None) -> metrics.Snapshot:
    """A snapshot of the store (None: nothing has run yet) and of the service's status
    (None: no service answers)."""
    sources = _sources(status.get("source_health")) if status is not None else {}
    if store is None:
        return metrics.Snapshot(service_up=status is not None, sources=sources)
    at = now or datetime.now(timezone.utc)
    oldest = store.oldest_waiting_question()
    head = store.get_audit_head(str(audit_log))
    return metrics.Snapshot(
        runs=store.run_counts(),
        steps={d.runbook: metrics.StepHistogram(d.at_most, d.sum_s, d.attempts)
               for d in store.step_durations(metrics.STEP_BUCKETS_S)},
        event_queue=store.queue_length(),
        oldest_question_age_s=max(0.0, (at - oldest).total_seconds()) if oldest else 0.0,
        service_up=status is not None,
        sources=sources,
        audit_records=head.seq if head is not None else 0,
        notifications=store.notification_counts(),
    )


def _sources(raw: object) -> dict[str, metrics.SourceHealth]:
    # From a JSON reply: a service of another version may send less, or nothing.
    if not isinstance(raw, Mapping):
        return {}
    out: dict[str, metrics.SourceHealth] = {}
    for name, info in raw.items():
        if isinstance(name, str) and isinstance(info, Mapping):
            last = info.get("last_event_time")
            out[name] = metrics.SourceHealth(
                bool(info.get("up")),
                float(last) if isinstance(last, (int, float)) else None)
    return out


def check_path(path: Path) -> None:
    """Refuse, at start-up, a metrics file that cannot be written, naming why."""
    folder = path.parent
    if not folder.is_dir():
        raise UsageError(f"--metrics-file {path}: the folder {folder} does not exist; "
                         "create it first (it is the folder node_exporter's "
                         "--collector.textfile.directory names)")
    if path.is_dir():
        raise UsageError(f"--metrics-file {path} is a folder; give a file name in it, "
                         f"e.g. {path / 'opsrun.prom'}")
    tmp = _tmp_name(path)
    try:
        # What each write does first: proves the folder takes new files, leaves PATH be.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE))
        os.unlink(tmp)
    except OSError as e:
        raise UsageError(f"--metrics-file {path} cannot be written: {e.strerror} (a temporary "
                         f"file in {folder} is written and renamed over it); give a folder "
                         "this user may write in") from None


def _tmp_name(path: Path) -> Path:
    # Not ending in .prom: the collector must not read the temporary file either.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader sees the old file or the new, whole."""
    tmp = _tmp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        try:
            os.fchmod(fd, FILE_MODE)  # whatever the umask
            data = text.encode()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class MetricsFileWriter:
    """Writes `render()` to `path` every `interval_s` seconds, in its own thread."""

    def __init__(self, path: Path, interval_s: float, render: Callable[[], str],
                 log: Log) -> None:
        self.path = path
        self.interval_s = interval_s
        self.render = render
        self.log = log
        self.stop_event = threading.Event()
        self.wrote = 0  # files written, for tests and the log
        self._thread: threading.Thread | None = None
        self._failing: str | None = None

    def start(self) -> MetricsFileWriter:
        """Start the thread; the first file is written at once."""
        self._thread = threading.Thread(target=self._loop, name="opsrun-metrics", daemon=True)
        self._thread.start()
        return self

    def stop(self, final: str | None = None) -> None:
        """End the thread; then write `final` (e.g. with opsrun_service_up 0) if given."""
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if final is not None:
            self._write(lambda: final)

    def _loop(self) -> None:
        while True:
            self._write(self.render)
            if self.stop_event.wait(self.interval_s):
                return

    def _write(self, render: Callable[[], str]) -> None:
        try:
            write_atomically(self.path, render())
        except Exception as e:  # noqa: BLE001 - metrics must never stop the service
            text = f"{type(e).__name__}: {e}"
            if text != self._failing:  # once per kind of failure, not every interval
                self.log("cannot write the metrics file", level="error",
                         path=str(self.path), error=text)
            self._failing = text
            return
        self.wrote += 1
        if self._failing is not None:
            self.log("the metrics file is written again", path=str(self.path))
            self._failing = None
