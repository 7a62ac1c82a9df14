"""The service's log: one line per event matched, run started, run finished, error.

Plain and without timestamps when stderr is not a terminal (journald adds its own);
with a time on a terminal; `--log-format json` for log shippers. Untrusted text is escaped.
"""
from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import datetime, timezone
from typing import IO, Any

from opsrun.terminal_text import safe


class DaemonLog:
    """Writes log lines to a stream (stderr), safely from any thread."""

    def __init__(self, fmt: str = "plain", stream: IO[str] | None = None) -> None:
        self.fmt = fmt
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._lock = threading.Lock()

    def __call__(self, message: str, level: str = "info", **fields: Any) -> None:
        fields = {k: v for k, v in fields.items() if v is not None}
        if self.fmt == "json":
            line = json.dumps({"time": _now(), "level": level, "msg": message, **fields},
                              default=str, ensure_ascii=False)
        else:
            # Messages may quote file names and log lines (the sources' own log lines do).
            parts = [safe(message, keep_newlines=False)] + [f"{k}={_value(v)}"
                                                            for k, v in fields.items()]
            line = " ".join(parts)
            if level != "info":
                line = f"{level}: {line}"
            if self.tty:
                line = f"{datetime.now().strftime('%H:%M:%S')} {line}"
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    def error(self, message: str, **fields: Any) -> None:
        self(message, level="error", **fields)

    def warning(self, message: str, **fields: Any) -> None:
        self(message, level="warning", **fields)

    def handler(self) -> logging.Handler:
        """A logging handler, so the sources' own log lines come out the same way."""
        log = self

        class _Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                level = "error" if record.levelno >= logging.ERROR else (
                    "warning" if record.levelno >= logging.WARNING else "info")
                log(record.getMessage(), level=level, component=record.name)

        return _Handler()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _value(v: Any) -> str:
    text = safe(str(v), keep_newlines=False)
    return json.dumps(text) if (" " in text or not text) else text


class LogListener:
    """An engine listener that logs when runs start and end."""

    def __init__(self, log: DaemonLog) -> None:
        self.log = log

    def transition(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "run.started":
            self.log("run started", run_id=data["run_id"], runbook=data["runbook"].name,
                     trigger=data.get("trigger"), resumed_at=data.get("resume_at"))
        elif kind == "run.finished":
            level = "info" if data["state"] == "succeeded" else "warning"
            self.log("run finished", level=level, run_id=data["run_id"],
                     runbook=data["runbook"].name, state=data["state"],
                     duration=f"{data['duration']:.3f}s", error=data.get("error"))
        elif kind == "confirm.asked":
            self.log("run waits for an answer", run_id=data["run_id"],
                     runbook=data["runbook"].name, step=data["step_id"])

    def output(self, step_id: str, stream: str, text: str, host: str | None) -> None:
        """Step output is kept in the store and the audit log, not in the service log."""
