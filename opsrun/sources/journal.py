"""Journal source: follows journald through `journalctl -f -o json` and turns matching
entries into events.

Following. Each journal trigger has its own journalctl (through opsrun.proc), asked for
what journalctl can filter itself: `_SYSTEMD_UNIT=` for units named literally, `--priority`
and the `fields:` matches (the same field given twice means either value, different fields
all of them, as journalctl combines matches). Unit globs and the `match:` regex are applied
here; the matcher checks every condition again. `--merge` is always given, because without
it `journalctl -f` follows the current boot only, which would miss what a previous boot
wrote after the cursor, and every entry of a forwarded journal (`directory:`).

Cursor. The cursor of the last entry taken is kept in the store under the trigger key.
Each event carries it (see opsrun.checkpoints), so the service stores it in the transaction
that records the event's runs; it is also stored after `emit` returns, and for entries
that fire nothing at most every second and at stop. journalctl is started with
`--cursor=KEPT` (not `--after-cursor`) and the first entry is dropped when it is the kept
one: with a cursor that is no longer in the journal (rotated or vacuumed away),
journalctl 252's `--after-cursor` skips the entry after the place the cursor would have,
losing it, while `--cursor` starts there. So entries written while opsrun was down are
seen exactly once; when the kept entry is gone, that is logged and reading goes on from
the first entry after its place (the oldest one left, after a vacuum), never repeating
what was taken. Without a kept cursor, `from: end` (default) takes the cursor of the last
entry there is at the start (`journalctl -n 1`) and stores it, so nothing written after
the start is missed even if journalctl takes a moment (for an empty journal it keeps ""
to mean "from its start"); `from: start` reads it all.

Trouble. journalctl that cannot be started (not installed) or that exits is logged with
its exit code and last error lines, and started again after a pause that doubles from
`backoff_s` up to `max_backoff_s`; the source never stops for it. A kept cursor journalctl
refuses as malformed is forgotten (logged) and the trigger starts again from the end.

Events: `trigger`, `message` (MESSAGE as text; bytes that are not UTF-8 become U+FFFD),
`unit` (_SYSTEMD_UNIT), `priority` (int), `hostname`, `pid` (int), `identifier`
(SYSLOG_IDENTIFIER), `cursor`, `timestamp` (RFC 3339 from __REALTIME_TIMESTAMP), `fields`
(every field of the entry, as text), and one field per named group of `match:` (a group
named like one of these is ignored). A field the entry lacks is null.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

from opsrun import journal_entries as je
from opsrun import proc
from opsrun.checkpoints import Checkpoint
from opsrun.event import Event, now_rfc3339
from opsrun.ids import new_id
from opsrun.runbook import JournalTrigger
from opsrun.sources.base import Emit, log

COMMIT_EVERY_S = 1.0
EMPTY = ""  # the cursor kept for a journal that was empty: read it from its start
MAX_LINE_BYTES = 16 * 1024 * 1024  # a longer line is not an entry journald writes
RESERVED = frozenset({"source", "id", "time", "trigger", *je.EVENT_FIELDS})
_STDERR_KEEP = 4096


class CursorStore(Protocol):
    """Where journal cursors are kept (opsrun.store.Store implements it)."""

    def get_journal_cursor(self, trigger_key: str) -> str | None:
        """The kept cursor of the trigger, or None."""

    def set_journal_cursor(self, trigger_key: str, cursor: str | None) -> None:
        """Keep (or with None forget) the trigger's cursor."""


class _Either(threading.Event):
    """Set when it is set or when `other` is: proc.run_streaming takes one cancel event,
    and journalctl must stop both when the service stops and when emitting failed."""

    def __init__(self, other: threading.Event) -> None:
        super().__init__()
        self._other = other

    def is_set(self) -> bool:
        return super().is_set() or self._other.is_set()


class JournalSource:
    """Follows the journal for one journal trigger."""

    name = "journal"

    def __init__(self, key: str, trigger: JournalTrigger, cursors: CursorStore, *,
                 journalctl: str = "journalctl", backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.key = key
        self.trigger = trigger
        self._cursors = cursors
        self._journalctl = journalctl
        self._backoff = backoff_s
        self._max_backoff = max_backoff_s
        self._clock = clock
        self._pattern = trigger.pattern
        self._conditions = (trigger.units, trigger.priority, dict(trigger.field_matches),
                            self._pattern)
        self._cursor: str | None = None  # of the last entry taken
        self._stored: str | None = None
        self._stored_at = 0.0
        self._loaded = False
        self.ready = threading.Event()
        """Set once the start position is known and journalctl was started (or failed)."""
        self.child_pid: int | None = None
        """The running journalctl's pid, or None."""
        self.starts = 0
        """How many times journalctl was started."""

    # ── the loop ────────────────────────────────────────────────────────────

    def run(self, stop: threading.Event, emit: Emit) -> None:
        """Follow until `stop` is set; journalctl is started again whenever it ends."""
        pause = self._backoff
        try:
            while not stop.is_set():
                began = self._clock()
                took = self._follow(stop, emit)
                if stop.is_set():
                    break
                if took or self._clock() - began >= self._max_backoff:
                    pause = self._backoff  # it worked for a while: not a crash loop
                log.warning("journal trigger %s: starting journalctl again in %gs",
                            self.key, pause)
                stop.wait(pause)
                pause = min(pause * 2, self._max_backoff)
        finally:
            self.ready.set()
            self._commit(force=True)

    def _follow(self, stop: threading.Event, emit: Emit) -> int:
        """One journalctl from start to end; return how many entries it gave."""
        known, cursor = self._start_cursor()
        if not known:
            self.ready.set()
            return 0
        argv = [*self._base_args(), "--follow",
                *(["--cursor", cursor] if cursor else ["--no-tail"])]
        halt = _Either(stop)
        state = _Stream(cursor or None)
        failure: list[BaseException] = []

        def on_output(stream: str, chunk: bytes) -> None:
            if stream == "stderr":
                state.stderr(chunk, self.key)
                return
            if halt.is_set():
                return
            try:
                self._take(state, chunk, emit)
            except BaseException as e:  # noqa: BLE001 - raised again once journalctl ends
                failure.append(e)
                halt.set()

        def started(pid: int) -> None:
            self.child_pid = pid
            self.starts += 1
            self.ready.set()

        log.info("journal trigger %s: following %s", self.key, _describe(argv, cursor))
        result = proc.run_streaming(argv, env=_env(), cwd=None, on_output=on_output,
                                    cancel=halt, grace_s=2.0, on_start=started)
        self.child_pid = None
        if failure:
            raise failure[0]
        self._commit(force=True)
        if stop.is_set():
            return state.entries
        if result.error is not None:
            log.error("journal trigger %s: %s%s", self.key, result.error,
                      _MISSING if "No such file" in result.error else "")
            self.ready.set()
            return 0
        errors = state.error_text()
        if cursor and state.entries == 0 and "cursor" in errors.lower():
            log.warning("journal trigger %s: journalctl refused the kept cursor (%s); "
                        "forgetting it and starting from the end", self.key, errors)
            self._cursor = None
            self._cursors.set_journal_cursor(self.key, None)
            self._stored = None
        log.warning("journal trigger %s: journalctl ended with exit code %s%s", self.key,
                    result.exit_code, f": {errors}" if errors else "")
        return state.entries

    def _start_cursor(self) -> tuple[bool, str | None]:
        """Where to start: the kept cursor, the last entry's (`from: end`), or None (all);
        (False, None) when the end of the journal cannot be read."""
        if not self._loaded:
            self._cursor = self._stored = self._cursors.get_journal_cursor(self.key)
            self._loaded = True
        if self._cursor is not None or self.trigger.start_at == "start":
            return True, self._cursor
        code, out, err = proc.capture([*self._base_args(), "--lines", "1"], timeout_s=30.0)
        if code != 0:
            log.error("journal trigger %s: cannot read the end of the journal with %s: %s%s",
                      self.key, self._journalctl, (err.strip() or f"exit code {code}")[-500:],
                      _MISSING if code == 127 else "")
            return False, None
        last = None
        for line in out.splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and isinstance(obj.get("__CURSOR"), str):
                last = obj["__CURSOR"]
        # Armed: what comes after it is new, also across a restart before the first entry.
        # An empty journal is kept as "" (every entry is new), not as no cursor at all,
        # which would take the end again at the next start and skip what came meanwhile.
        self._cursor = last if last is not None else EMPTY
        self._commit(force=True)
        return True, self._cursor

    def _base_args(self) -> list[str]:
        return journalctl_args(self.trigger, self._journalctl)

    # ── entries ─────────────────────────────────────────────────────────────

    def _take(self, state: _Stream, chunk: bytes, emit: Emit) -> None:
        """Entries of a chunk of journalctl's output → one batch of events, then the cursor."""
        events: list[Event] = []
        last: str | None = None
        for raw in state.lines(chunk, self.key):
            entry = _parse(raw, self.key)
            if entry is None:
                continue
            fields = je.decode_entry(entry)
            cursor = je.first(fields.get("__CURSOR"))
            if state.check_first:
                state.check_first = False
                if cursor == state.start:
                    continue  # the kept entry itself: taken before
                log.warning("journal trigger %s: the kept cursor is no longer in the journal "
                            "(rotated or vacuumed away); going on from the oldest entry "
                            "after it", self.key)
            state.entries += 1
            if cursor is not None:
                last = cursor
            data = je.event_fields(fields)
            groups = je.matches(*self._conditions, data)
            if groups is None:
                continue
            extra = {k: v for k, v in groups.items() if k not in RESERVED}
            mark = Checkpoint(journal_cursors=((self.key, cursor),)) if cursor else None
            events.append(Event("journal", {
                "source": "journal", "id": new_id(), "time": now_rfc3339(),
                "trigger": self.key, **data, **extra}, mark))
        if events:
            emit(events)
        if last is not None:
            self._cursor = last
            self._commit(force=bool(events))

    def _commit(self, *, force: bool = False) -> None:
        now = self._clock()
        if self._cursor is None or self._cursor == self._stored:
            return
        if force or now - self._stored_at >= COMMIT_EVERY_S:
            self._cursors.set_journal_cursor(self.key, self._cursor)
            self._stored, self._stored_at = self._cursor, now


_MISSING = (" (is journalctl installed? it is part of systemd; the trigger waits and tries "
            "again)")


class _Stream:
    """journalctl's output as it comes: whole lines of stdout, the tail of stderr."""

    def __init__(self, start: str | None) -> None:
        self.start = start
        self.check_first = start is not None
        self.entries = 0
        self._buf = b""
        self._skipping = False
        self._err = b""

    def lines(self, chunk: bytes, key: str) -> list[bytes]:
        data = self._buf + chunk
        parts = data.split(b"\n")
        self._buf = parts.pop()
        if self._skipping and parts:
            parts.pop(0)  # the rest of an over-long line
            self._skipping = False
        if len(self._buf) > MAX_LINE_BYTES:
            log.warning("journal trigger %s: an entry of over %d MiB is skipped", key,
                        MAX_LINE_BYTES >> 20)
            self._buf, self._skipping = b"", True
        return parts

    def stderr(self, chunk: bytes, key: str) -> None:
        self._err = (self._err + chunk)[-_STDERR_KEEP:]
        for line in chunk.decode("utf-8", "replace").splitlines():
            if line.strip():
                log.warning("journal trigger %s: journalctl: %s", key, line.strip())

    def error_text(self) -> str:
        lines = self._err.decode("utf-8", "replace").strip().splitlines()
        return "; ".join(lines[-3:])


def journalctl_args(t: JournalTrigger, journalctl: str = "journalctl") -> list[str]:
    """journalctl's command line for a trigger: JSON, and what journalctl can filter itself."""
    # Not --quiet: its hints (no access to the system journal for this user) go to
    # the log, where an operator looks for why nothing fires.
    args = [journalctl, "--output", "json", "--all", "--merge", "--no-pager"]
    if t.directory is not None:
        args += ["--directory", t.directory]
    if t.priority is not None:
        args += ["--priority", str(t.priority)]
    # With a glob among the units journalctl is asked for every unit: `-u GLOB` only
    # takes the units the journal knows when journalctl starts, not those that come.
    if not any(je.is_glob(u) for u in t.units):
        args += [f"_SYSTEMD_UNIT={unit}" for unit in t.units]
    for name, values in t.field_matches:
        args += [f"{name}={v}" for v in values]
    return args


class JournalBacklog(NamedTuple):
    """What a journal holds after a trigger's kept cursor (see `backlog`)."""

    entries: int  # entries journalctl gives after the cursor, before the `match:` regex
    error: str | None  # why they could not be counted


def backlog(t: JournalTrigger, cursor: str, journalctl: str = "journalctl",
            timeout_s: float = 10.0) -> JournalBacklog:
    """Count the entries after `cursor` (all of them for an empty journal's cursor)."""
    argv = [*journalctl_args(t, journalctl), *(["--cursor", cursor] if cursor else [])]
    code, out, err = proc.capture(argv, timeout_s=timeout_s)
    if code != 0:
        return JournalBacklog(0, (err.strip() or f"exit code {code}")[-300:])
    lines = [line for line in out.splitlines() if line.strip()]
    if lines and cursor:
        try:
            first = json.loads(lines[0])
        except ValueError:
            first = None
        if isinstance(first, dict) and first.get("__CURSOR") == cursor:
            lines = lines[1:]  # --cursor starts with the kept entry itself, already taken
    return JournalBacklog(len(lines), None)


def _parse(raw: bytes, key: str) -> dict[str, Any] | None:
    if not raw.strip():
        return None
    try:
        obj = json.loads(raw)
    except ValueError:
        log.warning("journal trigger %s: journalctl printed a line that is not JSON: %r",
                    key, raw[:200])
        return None
    return obj if isinstance(obj, dict) else None


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("SYSTEMD_PAGER", None)
    env["SYSTEMD_COLORS"] = "0"
    return env


def _describe(argv: Sequence[str], cursor: str | None) -> str:
    where = "after the kept cursor" if cursor else "from the start"
    return f"{' '.join(a for a in argv if a != cursor)} ({where})"
