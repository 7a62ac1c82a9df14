"""The only rich importer: tables and colour on a terminal, plain text elsewhere.

Colour is used only when stdout is a terminal and NO_COLOR is not set (no-color.org).
Every piece of untrusted text passes through `terminal_text.safe` before it is printed.

A step's own output counts as untrusted, on a terminal too: steps echo what events carry
(a file name, a log line), and a sequence from there could clear the screen, retitle the
window or hide the lines before it while an operator watches a production run. So control
characters in step output are always shown as `\x1b`-style escapes, in the live view,
plain lines, `opsrun logs` and the confirmation prompt alike; only opsrun's own styling
reaches the terminal. Tools that colour their output do so only on a terminal, and a step's
stdout is a pipe, so little is lost. The bytes are kept as they were in the state store and
in `--json` output, which are for programs rather than for a terminal.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import IO, Any

from opsrun.terminal_text import safe

__all__ = ["safe", "use_color", "print_json", "print_table", "heading", "error_line"]


def use_color(stream: IO[str] | None = None) -> bool:
    """Whether to decorate output: a terminal, and neither NO_COLOR nor TERM=dumb."""
    stream = stream or sys.stdout
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return stream.isatty()


def print_json(data: Any) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *,
                title: str | None = None) -> None:
    """A table: rich on a colour terminal, aligned plain columns otherwise."""
    cells = [[safe(str(c), keep_newlines=False) for c in row] for row in rows]
    if use_color():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, show_edge=False, header_style="bold")
        for h in headers:
            table.add_column(h, overflow="fold")
        for row in cells:
            table.add_row(*row)
        Console(highlight=False).print(table)
        return
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    if title:
        print(title)
    print("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)).rstrip())
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def heading(text: str) -> str:
    """A section heading: bold on a colour terminal."""
    return f"\x1b[1m{text}\x1b[0m" if use_color() else text


def error_line(text: str) -> str:
    """An error line: red on a colour terminal."""
    return f"\x1b[31m{text}\x1b[0m" if use_color() else text


# ── live run reports ────────────────────────────────────────────────────────

_MARKS = {"success": "✓", "failure": "✗", "skipped": "–", "denied": "✗", "timed_out": "⏱",
          "cancelled": "✗"}
_PLAIN_MARKS = {"success": "ok", "failure": "FAILED", "skipped": "skipped",
                "denied": "DENIED", "timed_out": "TIMED OUT", "cancelled": "cancelled"}


def _dur(seconds: float) -> str:
    from opsrun.durations import format_duration

    return format_duration(seconds)


class _LineBuffer:
    """Holds partial lines per (step, stream, host) so prefixes land on whole lines."""

    def __init__(self) -> None:
        self.partial: dict[tuple[str, str, str | None], str] = {}

    MAX_LINE = 16 * 1024  # a "line" with no end in sight is shown in pieces, not hoarded

    def feed(self, key: tuple[str, str, str | None], text: str) -> list[str]:
        text = self.partial.pop(key, "") + text
        lines = text.split("\n")
        rest = lines.pop()
        while len(rest) > self.MAX_LINE:
            lines.append(rest[: self.MAX_LINE])
            rest = rest[self.MAX_LINE:]
        if rest:
            self.partial[key] = rest
        return lines

    def flush(self, step_id: str) -> list[tuple[tuple[str, str, str | None], str]]:
        keys = [k for k in self.partial if k[0] == step_id]
        return [(k, self.partial.pop(k)) for k in keys]


class PlainReporter:
    """Plain prefixed lines: for pipes, logs, cron mail and NO_COLOR."""

    def __init__(self, stream: IO[str] | None = None, *, show_output: bool = True) -> None:
        self.out = stream or sys.stdout
        self.lines = _LineBuffer()
        self.show_output = show_output

    def _print(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def transition(self, kind: str, data: dict[str, Any]) -> None:
        sid = data.get("step_id", "")
        if kind == "run.started":
            resumed = f", resumed at step {data['resume_at'] + 1}" if data.get("resume_at") else ""
            name = safe(data["runbook"].name, keep_newlines=False)
            self._print(f"run {data['run_id']} of {name} started{resumed}")
        elif kind == "step.started":
            attempt = f" (attempt {data['attempt']} of {data['attempts']})" \
                if data["attempt"] > 1 else ""
            self._print(f"[{sid}] {safe(data['step_name'], keep_newlines=False)}{attempt}")
        elif kind == "step.finished":
            self._flush(sid)
            self._print(f"[{sid}] {self._finished(data)}")
        elif kind == "step.skipped":
            self._print(f"[{sid}] skipped (if: {safe(str(data['condition']), keep_newlines=False)})")
        elif kind in ("confirm.answered", "confirm.resumed"):
            self._print(f"[{sid}] {self._answer(data)}")
        elif kind == "confirm.closed":
            self._print(f"[{sid}] no answer: the run was {data['reason']}")
        elif kind == "run.finished":
            err = f": {safe(data['error'])}" if data.get("error") and data["state"] != "succeeded" \
                else ""
            self._print(f"run {data['run_id']} {data['state']} in "
                        f"{_dur(data['duration'])}{err}")

    def _answer(self, data: dict[str, Any]) -> str:
        from opsrun.describe import describe_answer

        text = describe_answer(data["approved"], data.get("answered_by"), data.get("how"))
        return text + (f": {safe(data['comment'])}" if data.get("comment") else "")

    def _finished(self, data: dict[str, Any]) -> str:
        outcome = data["outcome"]
        text = f"{_PLAIN_MARKS.get(outcome, outcome)} in {_dur(data['duration'])}"
        if outcome not in ("success", "skipped") and data.get("exit_code") is not None:
            text += f", exit code {data['exit_code']}"
        if data.get("error"):
            text += f": {safe(data['error'], keep_newlines=False)}"
        return text

    def output(self, step_id: str, stream: str, text: str, host: str | None) -> None:
        if not self.show_output:
            return
        for line in self.lines.feed((step_id, stream, host), text):
            self._line(step_id, stream, host, line)

    def _line(self, step_id: str, stream: str, host: str | None, line: str) -> None:
        mark = "|" if stream == "stdout" else "!"
        who = f"{step_id}@{host}" if host else step_id
        self._print(f"{who} {mark} {safe(line, keep_newlines=False)}")

    def _flush(self, step_id: str) -> None:
        for (sid, stream, host), line in self.lines.flush(step_id):
            self._line(sid, stream, host, line)


class RichReporter(PlainReporter):
    """A live view for a terminal: a spinner on the running step, output beneath, a summary."""

    def __init__(self) -> None:
        super().__init__()
        from rich.console import Console

        self.console = Console(highlight=False, soft_wrap=True)
        self.status: Any = None
        self.finished: list[tuple[str, str, str]] = []
        self.running: dict[str, str] = {}  # branches and loop items run side by side
        self.groups: dict[str, str] = {}  # the steps that hold them

    def _print(self, text: str) -> None:
        self.console.print(text, markup=False)

    def transition(self, kind: str, data: dict[str, Any]) -> None:
        sid = data.get("step_id", "")
        if kind == "run.started":
            name = _esc(safe(data["runbook"].name, keep_newlines=False))
            self.console.print(f"[bold]{name}[/] [dim]run {data['run_id']}[/]")
        elif kind == "step.started":
            attempt = f" (attempt {data['attempt']}/{data['attempts']})" if data["attempt"] > 1 \
                else ""
            step = data.get("step")
            holds = step is not None and (step.kind in ("parallel", "uses")
                                          or step.for_each is not None)
            (self.groups if holds else self.running)[sid] = \
                safe(data["step_name"], keep_newlines=False) + attempt
            self._show_running()
        elif kind == "step.finished":
            self._flush(sid)
            self.running.pop(sid, None)
            self.groups.pop(sid, None)
            self._stop_status()
            self._done(sid, data["step_name"], data["outcome"], self._finished(data))
            self._show_running()
        elif kind == "step.skipped":
            self._done(sid, data["step_name"], "skipped",
                       f"skipped (if: {safe(str(data['condition']), keep_newlines=False)})")
        elif kind in ("confirm.answered", "confirm.resumed"):
            self._stop_status()
            super().transition(kind, data)
            outcome = "success" if data["approved"] else (
                "timed_out" if data.get("how") == "timeout" else "denied")
            self.finished.append((sid, outcome, self._answer(data)))
        elif kind == "confirm.closed":
            self._stop_status()
            super().transition(kind, data)
            self.finished.append((sid, "cancelled", f"no answer: the run was {data['reason']}"))
        elif kind == "confirm.asked":
            self._stop_status()
            super().transition(kind, data)
        elif kind == "run.finished":
            self._stop_status()
            self._summary(data)

    def _done(self, sid: str, name: str, outcome: str, text: str) -> None:
        color = {"success": "green", "skipped": "dim"}.get(outcome, "red")
        mark = _MARKS.get(outcome, "?")
        self.console.print(f"[{color}]{mark}[/] {_esc(safe(name, keep_newlines=False))} "
                           f"[dim]{_esc(text)}[/]")
        self.finished.append((sid, outcome, text))

    def _show_running(self) -> None:
        """The spinner names the running step, or how many run at once and which."""
        self._stop_status()
        names = list(self.running.values()) or list(self.groups.values())[-1:]
        if not names:
            return
        text = names[-1] if len(names) == 1 else f"{len(names)} at once: {', '.join(names)}"
        self.status = self.console.status(_esc(text), spinner="dots")
        self.status.start()

    def _line(self, step_id: str, stream: str, host: str | None, line: str) -> None:
        # With several steps running (and around them), a line says whose it is.
        who = f"{host} " if host else (f"{step_id} " if len(self.running) > 1 else "")
        style = "" if stream == "stdout" else "yellow"
        self.console.print(f"  [dim]{_esc(who)}│[/] [{style}]{_esc(safe(line, keep_newlines=False))}"
                           f"[/{style}]" if style else
                           f"  [dim]{_esc(who)}│[/] {_esc(safe(line, keep_newlines=False))}")

    def _stop_status(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None

    def _summary(self, data: dict[str, Any]) -> None:
        from rich.table import Table

        table = Table(show_header=True, header_style="bold", show_edge=False, box=None)
        for col in ("step", "outcome", ""):
            table.add_column(col)
        for sid, outcome, text in self.finished:
            table.add_row(sid, outcome, text)
        self.console.print()
        self.console.print(table)
        color = "green" if data["state"] == "succeeded" else "red"
        err = f": {_esc(safe(data['error']))}" if data.get("error") and \
            data["state"] != "succeeded" else ""
        self.console.print(f"[{color} bold]{data['state']}[/] in {_dur(data['duration'])}{err}")


def _esc(text: str) -> str:
    from rich.markup import escape

    return str(escape(text))


def reporter(as_json: bool) -> Any:
    """The right live view for where stdout goes: rich, plain lines, or silent for --json."""
    if as_json:
        return PlainReporter(sys.stderr, show_output=False) if sys.stderr.isatty() else _Silent()
    return RichReporter() if use_color() else PlainReporter()


class _Silent:
    def transition(self, kind: str, data: dict[str, Any]) -> None:
        pass

    def output(self, step_id: str, stream: str, text: str, host: str | None) -> None:
        pass


def json_line(data: Any) -> str:
    """One compact JSON document on one line (for streams of results)."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=str)
