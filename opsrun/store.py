"""The state store: `state.db` in the state folder, and the only module that speaks SQL.

SQLite in WAL mode, so a CLI can read while the daemon writes. Every write is one short
`BEGIN IMMEDIATE` transaction (taking the write lock up front avoids the deadlock two
deferred transactions get into when both try to upgrade to writing); a busy database is
waited for up to BUSY_TIMEOUT_MS. The schema carries its version in `PRAGMA user_version`
and is brought forward by MIGRATIONS, applied in order, each exactly once.

Durability is `synchronous=FULL` by default: a write that returned survives a power cut,
like the fsynced audit log beside it. The service opens its store with `durable=False`
(`synchronous=NORMAL`): still atomic and safe against a crash of the process, but the last
transactions may be lost in a power cut — the audit log, synced record by record, stays
the durable account, and an event taken from the queue then comes back (at least once). One Store may be shared by threads; a lock serialises the use
of its single connection. Times are stored as RFC 3339 UTC text and returned as aware
datetimes; JSON columns are returned decoded.
"""
from __future__ import annotations

import enum
import json
import os
import resource
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple, Union

from opsrun import paths
from opsrun.audit.format import RunbookRef
from opsrun.checkpoints import Checkpoint, FileStat
from opsrun.errors import StateError
from opsrun.ids import new_id
from opsrun.throttle_window import ONCE_AFTER, ONCE_WITHIN, Entry, ThrottleSpec, Window, enter

BUSY_TIMEOUT_MS = 10_000
MAX_OUTPUT_BYTES = 64 * 1024  # DESIGN section 2: the last 64 KiB of a step's output

RUN_STATES = frozenset({"queued", "running", "waiting", "succeeded", "failed", "denied",
                        "timed_out", "cancelled", "interrupted"})
FINAL_RUN_STATES = frozenset({"succeeded", "failed", "denied", "timed_out", "cancelled"})
ANSWERS = frozenset({"approved", "denied"})

# Each migration is a list of statements run in one transaction. Append new migrations at
# the end; never edit one that has shipped.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE runs (
            id TEXT PRIMARY KEY, runbook TEXT NOT NULL, runbook_path TEXT,
            runbook_sha256 TEXT, state TEXT NOT NULL, event TEXT, params TEXT NOT NULL,
            started_by TEXT, started_uid INTEGER, trigger TEXT, created_at TEXT NOT NULL,
            started_at TEXT, finished_at TEXT, exit_code INTEGER, error TEXT,
            current_step INTEGER)""",
        "CREATE INDEX runs_by_runbook ON runs (runbook, id)",
        "CREATE INDEX runs_by_state ON runs (state, id)",
        """CREATE TABLE steps (
            run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            idx INTEGER NOT NULL, step_id TEXT NOT NULL, attempt INTEGER NOT NULL,
            outcome TEXT NOT NULL, started_at TEXT, finished_at TEXT, exit_code INTEGER,
            stdout_tail TEXT NOT NULL, stderr_tail TEXT NOT NULL, outputs TEXT NOT NULL,
            hosts TEXT NOT NULL, PRIMARY KEY (run_id, idx, attempt))""",
        """CREATE TABLE approvals (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            step_id TEXT NOT NULL, question TEXT NOT NULL, approvers TEXT NOT NULL,
            starter TEXT, asked_at TEXT NOT NULL, deadline TEXT, answer TEXT,
            answered_by TEXT, answered_uid INTEGER, comment TEXT, how TEXT,
            answered_at TEXT)""",
        # At most one unanswered question per step of a run.
        """CREATE UNIQUE INDEX approvals_pending ON approvals (run_id, step_id)
            WHERE answer IS NULL""",
        """CREATE TABLE log_positions (
            key TEXT PRIMARY KEY, device INTEGER NOT NULL, inode INTEGER NOT NULL,
            offset INTEGER NOT NULL, updated_at TEXT NOT NULL)""",
        """CREATE TABLE schedule_marks (
            trigger_key TEXT PRIMARY KEY, last_fire TEXT NOT NULL, updated_at TEXT NOT NULL)""",
        """CREATE TABLE event_queue (
            id INTEGER PRIMARY KEY AUTOINCREMENT, event TEXT NOT NULL,
            enqueued_at TEXT NOT NULL, source TEXT NOT NULL, leased_until REAL)""",
        """CREATE TABLE audit_head (
            log_path TEXT PRIMARY KEY, segment INTEGER NOT NULL, seq INTEGER NOT NULL,
            hash TEXT NOT NULL, updated_at TEXT NOT NULL)""",
        """CREATE TABLE audit_checkpoints (
            log_path TEXT NOT NULL, segment INTEGER NOT NULL, size INTEGER NOT NULL,
            sha256 TEXT NOT NULL, summary TEXT NOT NULL, verified_at TEXT NOT NULL,
            PRIMARY KEY (log_path, segment))""",
    ],
]
MIGRATIONS.append([
    # The bytes of every runbook version a run started with: a resumed or waiting run goes
    # on with the version it started with, whatever the file says now.
    """CREATE TABLE runbook_versions (
        sha256 TEXT PRIMARY KEY, path TEXT NOT NULL, body BLOB NOT NULL,
        saved_at TEXT NOT NULL)""",
])
MIGRATIONS.append([
    # One row per batch of events the service queued for `opsrun emit`, written with the
    # events: an emit whose service died before it answered can tell whether its batch
    # made it, and queue it itself only if not (exactly once).
    """CREATE TABLE emit_receipts (
        token TEXT PRIMARY KEY, events INTEGER NOT NULL, received_at TEXT NOT NULL)""",
    "CREATE INDEX emit_receipts_by_time ON emit_receipts (received_at)",
])
MIGRATIONS.append([
    # What the file source last reported of each path, per trigger: written with the runs
    # of the changes it reports, compared with the disk at the next start.
    """CREATE TABLE file_states (
        trigger_key TEXT NOT NULL, path TEXT NOT NULL, inode INTEGER NOT NULL,
        device INTEGER NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
        ctime_ns INTEGER NOT NULL, PRIMARY KEY (trigger_key, path))""",
    # A trigger whose files were looked at once (an empty folder has no file_states rows).
    """CREATE TABLE file_baselines (
        trigger_key TEXT PRIMARY KEY, taken_at TEXT NOT NULL)""",
])
MIGRATIONS.append([
    # A retry the engine waits to make: a service that stops meanwhile makes it at its
    # next start, at the time it was due, instead of calling the run interrupted.
    "ALTER TABLE runs ADD COLUMN retry_attempt INTEGER",
    "ALTER TABLE runs ADD COLUMN retry_at REAL",
])
MIGRATIONS.append([
    # Throttle windows (runbook `throttle:`): kept here so a restart neither forgets a
    # window nor loses the run a once_after window owes when it ends. A once_within row
    # ends with its window; a once_after row ends when its run is recorded.
    """CREATE TABLE throttles (
        runbook TEXT NOT NULL, key TEXT NOT NULL, mode TEXT NOT NULL,
        opened_at REAL NOT NULL, until REAL NOT NULL, events INTEGER NOT NULL,
        first_event_id TEXT NOT NULL, last_event_id TEXT NOT NULL, trigger TEXT,
        last_event TEXT, PRIMARY KEY (runbook, key, mode, opened_at))""",
    "CREATE INDEX throttles_by_until ON throttles (mode, until)",
])
MIGRATIONS.append([
    # Steps inside a step (parallel branches, loop items, a used runbook's steps) are kept
    # under their top-level step's idx, numbered by `sub` (0 for the top-level step itself).
    """CREATE TABLE steps_new (
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        idx INTEGER NOT NULL, sub INTEGER NOT NULL DEFAULT 0, step_id TEXT NOT NULL,
        attempt INTEGER NOT NULL, outcome TEXT NOT NULL, started_at TEXT, finished_at TEXT,
        exit_code INTEGER, stdout_tail TEXT NOT NULL, stderr_tail TEXT NOT NULL,
        outputs TEXT NOT NULL, hosts TEXT NOT NULL, PRIMARY KEY (run_id, idx, sub, attempt))""",
    """INSERT INTO steps_new (run_id, idx, sub, step_id, attempt, outcome, started_at,
        finished_at, exit_code, stdout_tail, stderr_tail, outputs, hosts)
        SELECT run_id, idx, 0, step_id, attempt, outcome, started_at, finished_at, exit_code,
        stdout_tail, stderr_tail, outputs, hosts FROM steps""",
    "DROP TABLE steps",
    "ALTER TABLE steps_new RENAME TO steps",
])
MIGRATIONS.append([
    # Migration 8: the service's last life (one row): when it started, when it was last
    # seen alive, and when it stopped cleanly, so that the next start can say how long it
    # was down (daemon.gap).
    """CREATE TABLE service_life (
        id INTEGER PRIMARY KEY CHECK (id = 1), pid INTEGER NOT NULL,
        started_at TEXT NOT NULL, seen_at TEXT NOT NULL, stopped_at TEXT)""",
])
MIGRATIONS.append([
    # Migration 9 (webhook): the dedupe keys of the webhook events queued lately (an
    # Alertmanager alert's fingerprint, status and startsAt), so that a notification
    # repeated within the window is answered but not queued again.
    """CREATE TABLE webhook_dedupe (
        key TEXT PRIMARY KEY, seen_at REAL NOT NULL)""",
    "CREATE INDEX webhook_dedupe_by_time ON webhook_dedupe (seen_at)",
])
MIGRATIONS.append([
    # Migration 10 (notify): notifications waiting to be delivered, so that a restart loses
    # none. `target` is the target as written (secrets unrendered), `message` the masked
    # message; `due_at` (Unix time) is the next attempt, `leased_until` a deliverer's claim.
    """CREATE TABLE notify_outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT, event TEXT NOT NULL,
        target TEXT NOT NULL, message TEXT NOT NULL, wait_step TEXT,
        created_at TEXT NOT NULL, due_at REAL NOT NULL, attempts INTEGER NOT NULL,
        state TEXT NOT NULL, leased_until REAL, last_error TEXT, done_at TEXT)""",
    "CREATE INDEX notify_outbox_due ON notify_outbox (state, due_at)",
])
MIGRATIONS.append([
    # Migration 11 (journal): the cursor of the last journald entry each journal trigger
    # has taken, written with the runs of the entries it reports.
    """CREATE TABLE journal_cursors (
        trigger_key TEXT PRIMARY KEY, cursor TEXT NOT NULL, updated_at TEXT NOT NULL)""",
])
SCHEMA_VERSION = len(MIGRATIONS)
RECEIPT_KEEP_S = 24 * 3600  # an emit looks for its receipt within seconds; keep a day


class _Unset(enum.Enum):
    UNSET = 0


UNSET = _Unset.UNSET
"""Marks an update_run argument that was not given (None means: set the column to NULL)."""


class RunRecord(NamedTuple):
    """One run of one runbook, as stored."""

    id: str
    runbook: str
    runbook_path: str | None
    runbook_sha256: str | None
    state: str
    event: dict[str, Any] | None
    params: dict[str, Any]
    started_by: str | None
    started_uid: int | None
    trigger: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    exit_code: int | None
    error: str | None
    current_step: int | None
    retry_attempt: int | None = None  # the attempt of current_step due at retry_at
    retry_at: float | None = None  # Unix time

    def runbook_ref(self) -> RunbookRef:
        """The runbook version the run started with, as the audit log names it."""
        return RunbookRef(self.runbook, self.runbook_path, self.runbook_sha256)


class StepRecord(NamedTuple):
    """One attempt of one step of a run; output is the bounded tail."""

    run_id: str
    position: int  # the step's place in the run (the engine's ordinal)
    step_id: str
    attempt: int
    outcome: str
    started_at: datetime | None
    finished_at: datetime | None
    exit_code: int | None
    stdout_tail: str
    stderr_tail: str
    outputs: dict[str, Any]
    hosts: dict[str, Any]
    sub: int = 0  # inside the step at `position`: its number there (0: that step itself)


class ApprovalRecord(NamedTuple):
    """A question put to a person; `answer` is None while it waits."""

    id: int
    run_id: str
    step_id: str
    question: str
    approvers: list[str]
    starter: str | None
    asked_at: datetime
    deadline: datetime | None
    answer: str | None
    answered_by: str | None
    answered_uid: int | None
    comment: str | None
    how: str | None
    answered_at: datetime | None


class ServiceLife(NamedTuple):
    """The last `opsrun watch` process, as it recorded itself."""

    pid: int
    started_at: datetime
    seen_at: datetime  # its last sign of life
    stopped_at: datetime | None  # None: it did not stop cleanly (or still runs)


class LogPosition(NamedTuple):
    """Where a followed log file was read up to."""

    key: str
    device: int
    inode: int
    offset: int


class QueuedEvent(NamedTuple):
    """A JSON event waiting in the durable queue; `source` says who put it there."""

    id: int
    event: dict[str, Any]
    enqueued_at: datetime
    source: dict[str, Any]


class WebhookQueued(NamedTuple):
    """What enqueue_webhook did: the queue ids, the duplicates left out, whether the queue
    was full (then nothing was queued), and the queue's depth afterwards."""

    ids: list[int]
    duplicates: int
    full: bool
    depth: int


class Notification(NamedTuple):
    """A notification in the outbox: pending, sent, gave_up, or dropped (a stale wait that
    was answered before it was due)."""

    id: int
    run_id: str | None
    event: str
    target: dict[str, Any]
    message: dict[str, Any]
    wait_step: str | None
    created_at: datetime
    due_at: float
    attempts: int
    state: str
    last_error: str | None


class AuditHead(NamedTuple):
    """The last record the audit log acknowledged: its segment number, seq and hash."""

    log_path: str
    segment: int
    seq: int
    hash: str


class StepDurations(NamedTuple):
    """The recorded step attempts of one runbook: counts at or under each bound, sum, count."""

    runbook: str
    at_most: tuple[int, ...]  # one cumulative count per bound given to step_durations
    sum_s: float
    attempts: int


class AuditCheckpoint(NamedTuple):
    """A segment that was verified whole: its size and digest, and verify's summary of it."""

    segment: int
    size: int
    sha256: str
    summary: dict[str, Any]


_Time = Union[datetime, None, _Unset]


class Store:
    """The state database of one state folder. Open with Store.open(state_dir)."""

    def __init__(self, conn: sqlite3.Connection, path: Path, durable: bool = True) -> None:
        self._conn = conn
        self.path = path
        self.durable = durable
        self._lock = threading.RLock()

    @classmethod
    def open(cls, state_dir: Path, *, durable: bool = True) -> Store:
        """Open (creating and migrating as needed) `state.db` in `state_dir`."""
        paths.ensure_state_dir(state_dir)
        path = state_dir / paths.STATE_DB
        try:
            # Create it ourselves so it starts 0600; SQLite gives -wal/-shm the same mode.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError as e:
            raise StateError(f"cannot create the state store {path}: {e.strerror}; "
                             "check the permissions of the state folder") from e
        try:
            conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000,
                                   isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise _state_error(path, "opening", e) from e
        store = cls(conn, path, durable)
        try:
            store._configure()
            store._migrate()
        except BaseException:
            conn.close()
            raise
        return store

    def close(self) -> None:
        """Close the connection; the Store cannot be used afterwards."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def schema_version(self) -> int:
        """The schema version of the open database."""
        with self._read("reading the schema version") as c:
            return int(c.execute("PRAGMA user_version").fetchone()[0])

    # ── runs and steps ──────────────────────────────────────────────────────

    def create_run(self, runbook: str, *, runbook_path: str | None = None,
                   runbook_sha256: str | None = None, event: Mapping[str, Any] | None = None,
                   params: Mapping[str, Any] | None = None, started_by: str | None = None,
                   started_uid: int | None = None, trigger: str | None = None,
                   state: str = "queued", run_id: str | None = None) -> RunRecord:
        """Record a new run (state `queued` unless told otherwise) and return it."""
        _check_state(state)
        rid = run_id or new_run_id()
        with self._write("recording a new run") as c:
            c.execute("INSERT INTO runs (id, runbook, runbook_path, runbook_sha256, state, "
                      "event, params, started_by, started_uid, trigger, created_at) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (rid, runbook, runbook_path, runbook_sha256, state,
                       None if event is None else _json(event), _json(params or {}),
                       started_by, started_uid, trigger, _ts(_now())))
        run = self.get_run(rid)
        assert run is not None
        return run

    def update_run(self, run_id: str, *, expect_state: str | Iterable[str] | None = None,
                   state: str | _Unset = UNSET, started_at: _Time = UNSET,
                   finished_at: _Time = UNSET, exit_code: int | None | _Unset = UNSET,
                   error: str | None | _Unset = UNSET,
                   current_step: int | None | _Unset = UNSET,
                   retry_attempt: int | None | _Unset = UNSET,
                   retry_at: float | None | _Unset = UNSET) -> bool:
        """Change the given columns of a run; return whether the run was changed.

        With `expect_state` the change applies only if the run is in (one of) those states,
        atomically: two processes racing to resume or cancel a run cannot both win.
        """
        sets: dict[str, Any] = {}
        if state is not UNSET:
            _check_state(state)
            sets["state"] = state
        for column, value in (("started_at", started_at), ("finished_at", finished_at)):
            if value is not UNSET:
                sets[column] = _ts(value)
        for column, plain in (("exit_code", exit_code), ("error", error),
                              ("current_step", current_step),
                              ("retry_attempt", retry_attempt), ("retry_at", retry_at)):
            if plain is not UNSET:
                sets[column] = plain
        if not sets:
            return self.get_run(run_id) is not None
        sql = f"UPDATE runs SET {', '.join(f'{k} = ?' for k in sets)} WHERE id = ?"
        args: list[Any] = [*sets.values(), run_id]
        if expect_state is not None:
            states = [expect_state] if isinstance(expect_state, str) else list(expect_state)
            sql += f" AND state IN ({', '.join('?' * len(states))})"
            args.extend(states)
        with self._write("updating a run") as c:
            return c.execute(sql, args).rowcount == 1

    def get_run(self, run_id: str) -> RunRecord | None:
        """The run with this id, or None."""
        with self._read("reading a run") as c:
            row = c.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = ?",
                            (run_id,)).fetchone()
        return None if row is None else _run(row)

    def list_runs(self, *, runbook: str | None = None, state: str | Iterable[str] | None = None,
                  limit: int = 50) -> list[RunRecord]:
        """Runs, newest first, optionally of one runbook and/or in some states."""
        where: list[str] = []
        args: list[Any] = []
        if runbook is not None:
            where.append("runbook = ?")
            args.append(runbook)
        if state is not None:
            states = [state] if isinstance(state, str) else list(state)
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args.extend(states)
        sql = f"SELECT {_RUN_COLUMNS} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        with self._read("listing runs") as c:
            rows = c.execute(sql, [*args, limit]).fetchall()
        return [_run(r) for r in rows]

    def record_step(self, run_id: str, index: int, step_id: str, *, outcome: str,
                    attempt: int = 1, started_at: datetime | None = None,
                    finished_at: datetime | None = None, exit_code: int | None = None,
                    stdout_tail: str = "", stderr_tail: str = "",
                    outputs: Mapping[str, Any] | None = None,
                    hosts: Mapping[str, Any] | None = None, sub: int = 0) -> StepRecord:
        """Insert or replace one attempt of a step; output beyond 64 KiB keeps its tail."""
        row = (run_id, index, step_id, attempt, outcome, _ts(started_at), _ts(finished_at),
               exit_code, _tail(stdout_tail), _tail(stderr_tail), _json(outputs or {}),
               _json(hosts or {}), sub)
        with self._write("recording a step") as c:
            c.execute("INSERT OR REPLACE INTO steps (run_id, idx, step_id, attempt, outcome, "
                      "started_at, finished_at, exit_code, stdout_tail, stderr_tail, outputs, "
                      "hosts, sub) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
        return _step(row)

    def steps_of(self, run_id: str) -> list[StepRecord]:
        """Every recorded step attempt of a run, in order."""
        with self._read("reading steps") as c:
            rows = c.execute(f"SELECT {_STEP_COLUMNS} FROM steps WHERE run_id = ? "
                             "ORDER BY idx, sub, attempt", (run_id,)).fetchall()
        return [_step(r) for r in rows]

    # ── approvals ───────────────────────────────────────────────────────────

    def create_approval(self, run_id: str, step_id: str, question: str, *,
                        approvers: Sequence[str] | Mapping[str, Any] = (),
                        starter: str | None = None,
                        deadline: datetime | None = None) -> ApprovalRecord:
        """Ask a question for a step; if that step already has one waiting, return that one."""
        with self._write("recording an approval request") as c:
            c.execute("INSERT INTO approvals (run_id, step_id, question, approvers, starter, "
                      "asked_at, deadline) VALUES (?, ?, ?, ?, ?, ?, ?) "
                      "ON CONFLICT (run_id, step_id) WHERE answer IS NULL DO NOTHING",
                      (run_id, step_id, question,
                       _json(dict(approvers) if isinstance(approvers, Mapping)
                             else list(approvers)), starter,
                       _ts(_now()), _ts(deadline)))
            row = c.execute(f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE run_id = ? "
                            "AND step_id = ? AND answer IS NULL", (run_id, step_id)).fetchone()
        return _approval(row)

    def answer_approval(self, run_id: str, answer: str, *, answered_by: str,
                        answered_uid: int | None, how: str, step_id: str | None = None,
                        comment: str | None = None) -> bool:
        """Answer the waiting question of a run; True if this answer won.

        Exactly one answer wins: the update only touches a question still unanswered, so
        of two people answering at once, one gets False and must be told it was too late.
        """
        if answer not in ANSWERS:
            raise ValueError(f"answer must be one of {sorted(ANSWERS)}, not {answer!r}")
        # Not for a run that has ended: its questions are closed, whatever a row says.
        sql = ("UPDATE approvals SET answer = ?, answered_by = ?, answered_uid = ?, "
               "comment = ?, how = ?, answered_at = ? WHERE run_id = ? AND answer IS NULL "
               f"AND NOT EXISTS ({_RUN_ENDED})")
        args: list[Any] = [answer, answered_by, answered_uid, comment, how, _ts(_now()), run_id,
                           *sorted(FINAL_RUN_STATES)]
        if step_id is not None:
            sql += " AND step_id = ?"
            args.append(step_id)
        with self._write("recording an answer") as c:
            return c.execute(sql, args).rowcount >= 1

    def close_questions(self, run_id: str, *, closed_by: str = "(cancelled)",
                        how: str = "cancel", uid: int | None = None) -> int:
        """Close every open question of a run that ended (denied, by `closed_by`, `how`).

        Return how many were open. Later answers find nothing waiting.
        """
        with self._write("closing a run's questions") as c:
            return c.execute("UPDATE approvals SET answer = 'denied', answered_by = ?, "
                             "answered_uid = ?, how = ?, answered_at = ? WHERE run_id = ? "
                             "AND answer IS NULL",
                             (closed_by, uid, how, _ts(_now()), run_id)).rowcount

    def pending_approvals(self, run_id: str | None = None) -> list[ApprovalRecord]:
        """Questions still waiting for an answer (of runs that have not ended), oldest first."""
        sql = (f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE answer IS NULL "
               f"AND NOT EXISTS ({_RUN_ENDED})")
        args: list[Any] = sorted(FINAL_RUN_STATES)
        if run_id is not None:
            sql += " AND run_id = ?"
            args.append(run_id)
        with self._read("listing pending approvals") as c:
            rows = c.execute(sql + " ORDER BY id", args).fetchall()
        return [_approval(r) for r in rows]

    def approvals_of(self, run_id: str) -> list[ApprovalRecord]:
        """Every question asked in a run, answered or not, oldest first."""
        with self._read("reading approvals") as c:
            rows = c.execute(f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE run_id = ? "
                             "ORDER BY id", (run_id,)).fetchall()
        return [_approval(r) for r in rows]

    # ── log positions and schedule marks ────────────────────────────────────

    def get_log_position(self, key: str) -> LogPosition | None:
        """Where the followed log `key` was read up to, or None."""
        with self._read("reading a log position") as c:
            row = c.execute("SELECT key, device, inode, offset FROM log_positions "
                            "WHERE key = ?", (key,)).fetchone()
        return None if row is None else LogPosition(*row)

    def set_log_position(self, key: str, device: int, inode: int, offset: int) -> None:
        """Remember where the followed log `key` was read up to."""
        with self._write("saving a log position") as c:
            c.execute("INSERT OR REPLACE INTO log_positions VALUES (?, ?, ?, ?, ?)",
                      (key, device, inode, offset, _ts(_now())))

    def get_schedule_mark(self, trigger_key: str) -> datetime | None:
        """When the schedule `trigger_key` last fired, or None."""
        with self._read("reading a schedule mark") as c:
            row = c.execute("SELECT last_fire FROM schedule_marks WHERE trigger_key = ?",
                            (trigger_key,)).fetchone()
        return None if row is None else _dt(row[0])

    def set_schedule_mark(self, trigger_key: str, fired_at: datetime) -> None:
        """Remember when the schedule `trigger_key` last fired."""
        with self._write("saving a schedule mark") as c:
            c.execute("INSERT OR REPLACE INTO schedule_marks VALUES (?, ?, ?)",
                      (trigger_key, _ts(fired_at), _ts(_now())))

    def get_journal_cursor(self, trigger_key: str) -> str | None:
        """The cursor of the last journal entry the trigger took, or None."""
        with self._read("reading a journal cursor") as c:
            row = c.execute("SELECT cursor FROM journal_cursors WHERE trigger_key = ?",
                            (trigger_key,)).fetchone()
        return None if row is None else str(row[0])

    def set_journal_cursor(self, trigger_key: str, cursor: str | None) -> None:
        """Remember the cursor of the last journal entry the trigger took (None: forget)."""
        with self._write("saving a journal cursor") as c:
            if cursor is None:
                c.execute("DELETE FROM journal_cursors WHERE trigger_key = ?", (trigger_key,))
            else:
                c.execute("INSERT OR REPLACE INTO journal_cursors VALUES (?, ?, ?)",
                          (trigger_key, cursor, _ts(_now())))

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Store where sources are up to, when no run goes with it."""
        if checkpoint:
            with self._write("saving source positions"):
                self._apply(checkpoint, _ts(_now()))

    def _apply(self, cp: Checkpoint, now: str | None) -> None:
        c = self._conn
        c.executemany("INSERT OR REPLACE INTO log_positions VALUES (?, ?, ?, ?, ?)",
                      [(*p, now) for p in cp.log_positions])
        c.executemany("INSERT OR REPLACE INTO file_states VALUES (?, ?, ?, ?, ?, ?, ?)",
                      [(key, path, *st) for key, path, st in cp.file_states if st is not None])
        c.executemany("DELETE FROM file_states WHERE trigger_key = ? AND path = ?",
                      [(key, path) for key, path, st in cp.file_states if st is None])
        c.executemany("INSERT OR REPLACE INTO journal_cursors VALUES (?, ?, ?)",
                      [(*jc, now) for jc in cp.journal_cursors])

    def file_baseline(self, trigger_key: str) -> dict[str, FileStat] | None:
        """What the file source last reported of each path of a trigger; None if it never
        looked."""
        with self._read("reading file states") as c:
            if c.execute("SELECT 1 FROM file_baselines WHERE trigger_key = ?",
                         (trigger_key,)).fetchone() is None:
                return None
            rows = c.execute("SELECT path, inode, device, size, mtime_ns, ctime_ns FROM "
                             "file_states WHERE trigger_key = ?", (trigger_key,)).fetchall()
        return {r[0]: (r[1], r[2], r[3], r[4], r[5]) for r in rows}

    def set_file_baseline(self, trigger_key: str, states: Mapping[str, FileStat]) -> None:
        """Take the paths of a trigger as they are now, as reported."""
        now = _ts(_now())
        with self._write("saving file states") as c:
            c.execute("DELETE FROM file_states WHERE trigger_key = ?", (trigger_key,))
            c.executemany("INSERT INTO file_states VALUES (?, ?, ?, ?, ?, ?, ?)",
                          [(trigger_key, path, *st) for path, st in states.items()])
            c.execute("INSERT OR REPLACE INTO file_baselines VALUES (?, ?)", (trigger_key, now))

    def keep_file_baselines(self, trigger_keys: Iterable[str]) -> None:
        """Forget the file states of triggers that are no longer in any runbook."""
        keep = sorted(set(trigger_keys))
        marks = ", ".join("?" * len(keep)) or "NULL"
        with self._write("forgetting old file states") as c:
            c.execute(f"DELETE FROM file_states WHERE trigger_key NOT IN ({marks})", keep)
            c.execute(f"DELETE FROM file_baselines WHERE trigger_key NOT IN ({marks})", keep)

    # ── the event queue (at-least-once hand-off) ────────────────────────────

    def enqueue_events(self, events: Sequence[Mapping[str, Any]], *,
                       source: Mapping[str, Any] | None = None,
                       receipt: str | None = None) -> list[int]:
        """Add events to the queue in one transaction; return their ids.

        With `receipt` (a token the sender chose), the same transaction keeps a receipt
        that `has_receipt` finds; a token already received queues nothing again.
        """
        now, src = _ts(_now()), _json(source or {})
        with self._write("queueing events") as c:
            if receipt is not None:
                c.execute("DELETE FROM emit_receipts WHERE received_at < ?",
                          (_ts(datetime.fromtimestamp(time.time() - RECEIPT_KEEP_S,
                                                      timezone.utc)),))
                if c.execute("INSERT OR IGNORE INTO emit_receipts VALUES (?, ?, ?)",
                             (receipt, len(events), now)).rowcount == 0:
                    return []
            return [int(c.execute("INSERT INTO event_queue (event, enqueued_at, source) "
                                  "VALUES (?, ?, ?)", (_json(e), now, src)).lastrowid or 0)
                    for e in events]

    def enqueue_webhook(self, events: Sequence[tuple[Mapping[str, Any], str | None]], *,
                        source: Mapping[str, Any], max_depth: int, dedupe_window_s: float,
                        now: float | None = None) -> WebhookQueued:
        """Queue a webhook request's events in one transaction, unless the queue is full.

        Each event comes with its dedupe key (None: none): an event whose key was queued
        within `dedupe_window_s` is a duplicate and is not queued again. When the queue
        already holds `max_depth` events, nothing is queued or remembered (`full`).
        """
        at = time.time() if now is None else now
        src = _json(source)
        with self._write("queueing webhook events") as c:
            depth = int(c.execute("SELECT count(*) FROM event_queue").fetchone()[0])
            if depth >= max_depth:
                return WebhookQueued([], 0, True, depth)
            c.execute("DELETE FROM webhook_dedupe WHERE seen_at < ?", (at - dedupe_window_s,))
            ids, duplicates, stamp = [], 0, _ts(_now())
            for event, key in events:
                if key is not None:
                    row = c.execute("SELECT seen_at FROM webhook_dedupe WHERE key = ?",
                                    (key,)).fetchone()
                    if row is not None and row[0] >= at - dedupe_window_s:
                        duplicates += 1
                        continue
                    c.execute("INSERT OR REPLACE INTO webhook_dedupe VALUES (?, ?)", (key, at))
                ids.append(int(c.execute(
                    "INSERT INTO event_queue (event, enqueued_at, source) VALUES (?, ?, ?)",
                    (_json(event), stamp, src)).lastrowid or 0))
            return WebhookQueued(ids, duplicates, False, depth + len(ids))

    def has_receipt(self, token: str) -> bool:
        """Whether a batch of events sent with this receipt token was queued."""
        with self._read("reading an emit receipt") as c:
            return c.execute("SELECT 1 FROM emit_receipts WHERE token = ?",
                             (token,)).fetchone() is not None

    def peek_events(self, limit: int = 100) -> list[QueuedEvent]:
        """The oldest queued events, leased or not, without taking them."""
        with self._read("reading the event queue") as c:
            rows = c.execute("SELECT id, event, enqueued_at, source FROM event_queue "
                             "ORDER BY id LIMIT ?", (limit,)).fetchall()
        return [_queued(r) for r in rows]

    def take_events(self, limit: int = 100, *, lease_s: float = 60.0) -> list[QueuedEvent]:
        """Lease the oldest events nobody holds; ack them when done.

        An event that is not acked within `lease_s` (its taker died) is handed out again:
        delivery is at least once.
        """
        now = time.time()
        with self._write("taking events from the queue") as c:
            rows = c.execute("SELECT id, event, enqueued_at, source FROM event_queue "
                             "WHERE leased_until IS NULL OR leased_until < ? "
                             "ORDER BY id LIMIT ?", (now, limit)).fetchall()
            c.executemany("UPDATE event_queue SET leased_until = ? WHERE id = ?",
                          [(now + lease_s, r[0]) for r in rows])
        return [_queued(r) for r in rows]

    def release_leases(self) -> int:
        """Hand every leased event out again at once; return how many were leased.

        For the one process that drains the queue, at its start: whatever is leased then
        was taken by a drainer that died, and need not wait for its lease to run out.
        """
        with self._write("releasing leased events") as c:
            return c.execute("UPDATE event_queue SET leased_until = NULL "
                             "WHERE leased_until IS NOT NULL").rowcount

    def accept_queued(self, queue_id: int, runs: Sequence[Mapping[str, Any]],
                      throttled: dict[str, Entry] | None = None) -> bool:
        """Record the runs a queued event starts and remove the event, in one transaction.

        False (and nothing recorded) when the event is no longer in the queue: another
        process took it first. So an emitted event starts its runs exactly once.
        """
        return queue_id in self.record_runs([], [(queue_id, runs)], throttled=throttled)

    def record_runs(self, runs: Sequence[Mapping[str, Any]],
                    queued: Sequence[tuple[int, Sequence[Mapping[str, Any]]]] = (),
                    checkpoint: Checkpoint | None = None, *,
                    throttled: dict[str, Entry] | None = None) -> set[int]:
        """Record new runs, and the runs of queued events with their removal from the
        queue, and where their sources are up to, all in one transaction; return the queue
        ids that were still there.

        The runs of an event no longer in the queue (another process took it first) are
        not recorded, so an emitted event starts its runs exactly once; a checkpoint
        stored with its runs makes a log line or file change start them exactly once.
        A run with a `throttle` (a ThrottleSpec) goes through its throttle window in the
        same transaction and is recorded only if the window lets it run; what the window
        did is put in `throttled` under the run's id.
        """
        now = _ts(_now())
        clock = time.time()
        accepted: set[int] = set()
        with self._write("recording runs"):
            if checkpoint:
                self._apply(checkpoint, now)
            for r in runs:
                self._insert_throttled(r, now, clock, throttled)
            for queue_id, event_runs in queued:
                if self._conn.execute("DELETE FROM event_queue WHERE id = ?",
                                      (queue_id,)).rowcount == 0:
                    continue
                accepted.add(queue_id)
                for r in event_runs:
                    self._insert_throttled(r, now, clock, throttled)
        return accepted

    def _insert_throttled(self, r: Mapping[str, Any], now: str | None, clock: float,
                          throttled: dict[str, Entry] | None) -> None:
        spec = r.get("throttle")
        if spec is None:
            self._insert_run(r, now)
            return
        entry = self._enter_window(r, spec, clock)
        if throttled is not None:
            throttled[r["run_id"]] = entry
        if entry.runs:
            self._insert_run(r, now)

    # ── throttle windows ───────────────────────────────────────────────────

    def _enter_window(self, r: Mapping[str, Any], spec: ThrottleSpec, clock: float) -> Entry:
        """Apply one event to its throttle window; inside the caller's transaction."""
        c = self._conn
        # once_within windows that ended mean nothing any more (any key: they would pile up
        # with the keys of a storm); once_after ones wait to be fired.
        c.execute("DELETE FROM throttles WHERE mode = ? AND until <= ?", (ONCE_WITHIN, clock))
        row = c.execute(f"SELECT {_THROTTLE_COLUMNS} FROM throttles WHERE runbook = ? AND "
                        "key = ? AND mode = ? AND until > ? ORDER BY opened_at DESC LIMIT 1",
                        (r["runbook"], spec.key, spec.mode, clock)).fetchone()
        event = dict(r.get("event") or {})
        kept = {"source": r.get("event_source") or "json", "data": event}
        entry = enter(None if row is None else _window(row), r["runbook"], spec, clock,
                      str(event.get("id", "")), r.get("trigger"), kept)
        w = entry.window
        if entry.opened:
            c.execute(f"INSERT INTO throttles ({_THROTTLE_COLUMNS}) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (w.runbook, w.key, w.mode, w.opened_at, w.until, w.events,
                       w.first_event_id, w.last_event_id, w.trigger,
                       None if w.last_event is None else _json(w.last_event)))
        else:
            c.execute("UPDATE throttles SET events = ?, last_event_id = ?, trigger = ?, "
                      "last_event = ? WHERE runbook = ? AND key = ? AND mode = ? AND "
                      "opened_at = ?",
                      (w.events, w.last_event_id, w.trigger,
                       None if w.last_event is None else _json(w.last_event),
                       w.runbook, w.key, w.mode, w.opened_at))
        return entry

    def throttle_windows(self, runbook: str | None = None, *,
                         now: float | None = None) -> list[Window]:
        """Windows still open, and once_after windows that ended but have not fired yet;
        oldest first."""
        clock = time.time() if now is None else now
        where, args = "(until > ? OR mode = ?)", [clock, ONCE_AFTER]
        if runbook is not None:
            where, args = where + " AND runbook = ?", [*args, runbook]
        with self._read("reading throttle windows") as c:
            rows = c.execute(f"SELECT {_THROTTLE_COLUMNS} FROM throttles WHERE {where} "
                             "ORDER BY opened_at", args).fetchall()
        return [_window(r) for r in rows]

    def count_throttles(self, *, now: float | None = None) -> int:
        """How many windows `throttle_windows` would list."""
        clock = time.time() if now is None else now
        with self._read("counting throttle windows") as c:
            return int(c.execute("SELECT count(*) FROM throttles WHERE until > ? OR mode = ?",
                                 (clock, ONCE_AFTER)).fetchone()[0])

    def open_throttle(self, runbook: str, key: str, mode: str, *,
                      now: float | None = None) -> Window | None:
        """The window open now for this runbook, key and mode, or None."""
        clock = time.time() if now is None else now
        with self._read("reading a throttle window") as c:
            row = c.execute(f"SELECT {_THROTTLE_COLUMNS} FROM throttles WHERE runbook = ? "
                            "AND key = ? AND mode = ? AND until > ? ORDER BY opened_at DESC "
                            "LIMIT 1", (runbook, key, mode, clock)).fetchone()
        return None if row is None else _window(row)

    def due_throttles(self, runbooks: Iterable[str], *,
                      now: float | None = None) -> list[Window]:
        """The once_after windows of these runbooks that have ended, oldest end first."""
        names = sorted(set(runbooks))
        if not names:
            return []
        clock = time.time() if now is None else now
        with self._read("reading due throttle windows") as c:
            rows = c.execute(f"SELECT {_THROTTLE_COLUMNS} FROM throttles WHERE mode = ? AND "
                             f"until <= ? AND runbook IN ({', '.join('?' * len(names))}) "
                             "ORDER BY until", (ONCE_AFTER, clock, *names)).fetchall()
        return [_window(r) for r in rows]

    def next_throttle_end(self, runbooks: Iterable[str]) -> float | None:
        """When the first once_after window of these runbooks ends (Unix time), or None."""
        names = sorted(set(runbooks))
        if not names:
            return None
        with self._read("reading throttle windows") as c:
            row = c.execute(f"SELECT min(until) FROM throttles WHERE mode = ? AND runbook "
                            f"IN ({', '.join('?' * len(names))})",
                            (ONCE_AFTER, *names)).fetchone()
        return None if row[0] is None else float(row[0])

    def fire_throttle(self, window: Window, run: Mapping[str, Any] | None) -> bool:
        """Close an ended once_after window and record the run it owes (None: it starts
        none, e.g. its concurrency policy skipped it), in one transaction.

        False (nothing recorded) when the window is gone: another process fired it first.
        """
        with self._write("firing a throttle window") as c:
            if c.execute("DELETE FROM throttles WHERE runbook = ? AND key = ? AND mode = ? "
                         "AND opened_at = ?", (window.runbook, window.key, window.mode,
                                               window.opened_at)).rowcount == 0:
                return False
            if run is not None:
                self._insert_run(run, _ts(_now()))
        return True

    def _insert_run(self, r: Mapping[str, Any], now: str | None) -> None:
        _check_state(r.get("state", "queued"))
        self._conn.execute(
            "INSERT INTO runs (id, runbook, runbook_path, runbook_sha256, state, event, params, "
            "started_by, started_uid, trigger, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (r["run_id"], r["runbook"], r.get("runbook_path"), r.get("runbook_sha256"),
             r.get("state", "queued"), _json(r.get("event")), _json(r.get("params") or {}),
             r.get("started_by"), r.get("started_uid"), r.get("trigger"), now))

    def oldest_queued_at(self) -> datetime | None:
        """When the oldest event still in the queue was queued, or None."""
        with self._read("reading the event queue") as c:
            row = c.execute("SELECT min(enqueued_at) FROM event_queue").fetchone()
        return _dt(row[0]) if row else None

    def log_positions(self, trigger_key: str) -> list[LogPosition]:
        """Every stored position of a log trigger (one per followed file)."""
        prefix = f"{trigger_key}:"
        with self._read("reading log positions") as c:
            rows = c.execute("SELECT key, device, inode, offset FROM log_positions "
                             "WHERE substr(key, 1, ?) = ? ORDER BY key",
                             (len(prefix), prefix)).fetchall()
        return [LogPosition(*r) for r in rows]

    # ── the service's life (for the report of what happened while it was down) ──

    def service_life(self) -> ServiceLife | None:
        """The last service's row: its pid, start, last sign of life and clean stop."""
        with self._read("reading the service's last life") as c:
            row = c.execute("SELECT pid, started_at, seen_at, stopped_at FROM service_life "
                            "WHERE id = 1").fetchone()
        if row is None:
            return None
        return ServiceLife(int(row[0]), _dt(row[1]) or _now(), _dt(row[2]) or _now(),
                           _dt(row[3]))

    def service_started(self, pid: int) -> None:
        """A service starts: it replaces the last one's row."""
        now = _ts(_now())
        with self._write("recording the service's start") as c:
            c.execute("INSERT OR REPLACE INTO service_life VALUES (1, ?, ?, ?, NULL)",
                      (pid, now, now))

    def service_seen(self, *, stopped: bool = False) -> None:
        """The service is alive now (or, with `stopped`, stops cleanly now)."""
        now = _ts(_now())
        with self._write("recording that the service is alive") as c:
            c.execute("UPDATE service_life SET seen_at = ?, stopped_at = ? WHERE id = 1",
                      (now, now if stopped else None))

    def queue_length(self) -> int:
        """How many events are in the queue, leased or not."""
        with self._read("counting the event queue") as c:
            return int(c.execute("SELECT count(*) FROM event_queue").fetchone()[0])

    # ── counts for metrics (opsrun metrics): one cheap aggregate query each ────

    def run_counts(self) -> dict[tuple[str, str], int]:
        """How many runs each runbook has in each state, by (runbook, state)."""
        with self._read("counting runs") as c:
            rows = c.execute("SELECT runbook, state, count(*) FROM runs "
                             "GROUP BY runbook, state").fetchall()
        return {(r[0], r[1]): int(r[2]) for r in rows}

    def step_durations(self, bounds: Sequence[float]) -> list[StepDurations]:
        """Per runbook, how many recorded step attempts took at most each of `bounds`
        seconds (cumulative, as a Prometheus histogram counts), their total and count.

        Only top-level steps (sub 0) with both times: a nested step's time is inside its
        parent's already. Seconds come from the stored text to the microsecond; julianday()
        would lose a fraction of a millisecond to floating point.
        """
        duration = ("(CAST(strftime('%s', s.finished_at) AS INTEGER) - "
                    "CAST(strftime('%s', s.started_at) AS INTEGER)) + "
                    "(CAST(substr(s.finished_at, 21, 6) AS INTEGER) - "
                    "CAST(substr(s.started_at, 21, 6) AS INTEGER)) / 1e6")
        le = "".join(", coalesce(sum(d <= ?), 0)" for _ in bounds)
        sql = (f"SELECT runbook{le}, coalesce(sum(d), 0.0), count(*) FROM "
               f"(SELECT r.runbook AS runbook, {duration} AS d FROM steps s "
               "JOIN runs r ON r.id = s.run_id WHERE s.sub = 0 AND s.started_at IS NOT NULL "
               "AND s.finished_at IS NOT NULL) GROUP BY runbook ORDER BY runbook")
        with self._read("summing step durations") as c:
            rows = c.execute(sql, [float(b) for b in bounds]).fetchall()
        n = len(bounds)
        return [StepDurations(r[0], tuple(int(x) for x in r[1:n + 1]), float(r[n + 1]),
                              int(r[n + 2])) for r in rows]

    def oldest_waiting_question(self) -> datetime | None:
        """When the oldest unanswered question of a `waiting` run was asked, or None."""
        with self._read("reading the oldest pending approval") as c:
            row = c.execute("SELECT min(a.asked_at) FROM approvals a JOIN runs r "
                            "ON r.id = a.run_id WHERE a.answer IS NULL "
                            "AND r.state = 'waiting'").fetchone()
        return _dt(row[0]) if row else None

    # ── audit log bookkeeping ───────────────────────────────────────────────

    def get_audit_head(self, log_path: str) -> AuditHead | None:
        """The last acknowledged record of the audit log at `log_path`, or None."""
        with self._read("reading the audit head") as c:
            row = c.execute("SELECT log_path, segment, seq, hash FROM audit_head "
                            "WHERE log_path = ?", (log_path,)).fetchone()
        return None if row is None else AuditHead(*row)

    def set_audit_head(self, head: AuditHead) -> None:
        """Move the audit head forward; an older head (lower seq) never replaces a newer.

        This write is not synced on its own (the next synced commit carries it): the record
        it points at was fsynced already, and a head that lags after a power cut only means
        verify checks fewer records against it. It keeps durable appends at one fsync each.
        """
        if not self.durable:  # already NORMAL: two statements less per audit record
            self._set_audit_head(head)
            return
        with self._lock, self._errors("saving the audit head"):
            self._conn.execute("PRAGMA synchronous = NORMAL")
            try:
                self._set_audit_head(head)
            finally:
                self._conn.execute(f"PRAGMA synchronous = {self._sync}")

    def _set_audit_head(self, head: AuditHead) -> None:
        with self._write("saving the audit head") as c:
            c.execute("INSERT INTO audit_head VALUES (?, ?, ?, ?, ?) "
                      "ON CONFLICT (log_path) DO UPDATE SET segment = excluded.segment, "
                      "seq = excluded.seq, hash = excluded.hash, "
                      "updated_at = excluded.updated_at WHERE excluded.seq > audit_head.seq",
                      (head.log_path, head.segment, head.seq, head.hash, _ts(_now())))

    def audit_checkpoints(self, log_path: str) -> dict[int, AuditCheckpoint]:
        """Closed segments of `log_path` verified before, by segment number."""
        with self._read("reading audit checkpoints") as c:
            rows = c.execute("SELECT segment, size, sha256, summary FROM audit_checkpoints "
                             "WHERE log_path = ?", (log_path,)).fetchall()
        return {r[0]: AuditCheckpoint(r[0], r[1], r[2], json.loads(r[3])) for r in rows}

    def save_audit_checkpoint(self, log_path: str, checkpoint: AuditCheckpoint) -> None:
        """Remember that a closed segment with this size and digest verified."""
        with self._write("saving an audit checkpoint") as c:
            c.execute("INSERT OR REPLACE INTO audit_checkpoints VALUES (?, ?, ?, ?, ?, ?)",
                      (log_path, checkpoint.segment, checkpoint.size, checkpoint.sha256,
                       _json(checkpoint.summary), _ts(_now())))

    def forget_audit_checkpoints(self, log_path: str, segments: Iterable[int]) -> None:
        """Drop what was remembered of segments that are gone (pruned)."""
        with self._write("forgetting audit checkpoints") as c:
            c.executemany("DELETE FROM audit_checkpoints WHERE log_path = ? AND segment = ?",
                          [(log_path, n) for n in segments])

    # ── runbook versions and approvals by step (used to resume runs) ───────

    def save_runbook_version(self, sha256: str, path: str, body: bytes) -> None:
        """Keep the bytes of a runbook version a run uses (once per version)."""
        with self._write("saving a runbook version") as c:
            c.execute("INSERT OR IGNORE INTO runbook_versions VALUES (?, ?, ?, ?)",
                      (sha256, path, body, _ts(_now())))

    def runbook_version(self, sha256: str) -> tuple[str, bytes] | None:
        """(path, bytes) of a kept runbook version, or None."""
        with self._read("reading a runbook version") as c:
            row = c.execute("SELECT path, body FROM runbook_versions WHERE sha256 = ?",
                            (sha256,)).fetchone()
        return None if row is None else (row[0], bytes(row[1]))

    def latest_approval(self, run_id: str, step_id: str) -> ApprovalRecord | None:
        """The newest question asked for a step of a run, answered or not."""
        with self._read("reading an approval") as c:
            row = c.execute(f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE run_id = ? "
                            "AND step_id = ? ORDER BY id DESC LIMIT 1",
                            (run_id, step_id)).fetchone()
        return None if row is None else _approval(row)

    def unanswer_approval(self, approval_id: int) -> None:
        """Take back an answer that could not be put on record (the audit log failed)."""
        with self._write("taking back an answer") as c:
            c.execute("UPDATE approvals SET answer = NULL, answered_by = NULL, "
                      "answered_uid = NULL, comment = NULL, how = NULL, answered_at = NULL "
                      "WHERE id = ?", (approval_id,))

    # ── the notification outbox ─────────────────────────────────────────────

    def queue_notifications(self, items: Sequence[Mapping[str, Any]]) -> list[int]:
        """Add notifications (run_id, event, target, message, due_at, wait_step); their ids."""
        now = _ts(_now())
        with self._write("queueing notifications") as c:
            return [int(c.execute(
                "INSERT INTO notify_outbox (run_id, event, target, message, wait_step, "
                "created_at, due_at, attempts, state) VALUES (?, ?, ?, ?, ?, ?, ?, 0, "
                "'pending')", (n.get("run_id"), n["event"], _json(n["target"]),
                               _json(n["message"]), n.get("wait_step"), now,
                               float(n["due_at"]))).lastrowid or 0) for n in items]

    def take_notifications(self, *, now: float, lease_s: float, limit: int = 20,
                           ids: Iterable[int] | None = None) -> list[Notification]:
        """Claim pending notifications that are due and that no deliverer holds.

        A claim lasts `lease_s` plus the target's timeout: a deliverer that died meanwhile
        leaves it to another.
        """
        only = "" if ids is None else \
            f" AND id IN ({', '.join(str(int(i)) for i in ids) or 'NULL'})"
        with self._write("taking notifications") as c:
            rows = c.execute(f"SELECT {_NOTIFY_COLUMNS} FROM notify_outbox WHERE state = "
                             "'pending' AND due_at <= ? AND (leased_until IS NULL OR "
                             f"leased_until < ?){only} ORDER BY due_at, id LIMIT ?",
                             (now, now, limit)).fetchall()
            # Held for the target's own timeout on top: a slow attempt keeps its claim.
            c.executemany("UPDATE notify_outbox SET leased_until = ? WHERE id = ?",
                          [(now + lease_s + float(json.loads(r[3]).get("timeout_s") or 0),
                            r[0]) for r in rows])
        return [_notification(r) for r in rows]

    def notification_tried(self, notify_id: int, *, state: str, attempts: int,
                           due_at: float | None = None, error: str | None = None) -> None:
        """Record an attempt's outcome and let go of the claim."""
        done = None if state == "pending" else _ts(_now())
        with self._write("recording a notification attempt") as c:
            c.execute("UPDATE notify_outbox SET state = ?, attempts = ?, due_at = "
                      "COALESCE(?, due_at), last_error = ?, leased_until = NULL, done_at = ? "
                      "WHERE id = ?", (state, attempts, due_at, error, done, notify_id))

    def notifications(self, *, state: str | None = None, limit: int = 100,
                      ids: Iterable[int] | None = None) -> list[Notification]:
        """Notifications, newest first (all, or in one state, or these ids)."""
        where, args = [], []
        if state is not None:
            where.append("state = ?")
            args.append(state)
        if ids is not None:
            where.append(f"id IN ({', '.join(str(int(i)) for i in ids) or 'NULL'})")
        sql = (f"SELECT {_NOTIFY_COLUMNS} FROM notify_outbox"
               + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY id DESC "
               "LIMIT ?")
        with self._read("reading notifications") as c:
            rows = c.execute(sql, (*args, limit)).fetchall()
        return [_notification(r) for r in rows]

    def notification_counts(self) -> dict[str, int]:
        """How many notifications are in each state."""
        with self._read("counting notifications") as c:
            return {r[0]: int(r[1]) for r in c.execute(
                "SELECT state, COUNT(*) FROM notify_outbox GROUP BY state")}

    def find_run_ids(self, prefix: str, limit: int = 5) -> list[str]:
        """Run ids starting with a prefix (people type the first few characters)."""
        with self._read("looking up a run id") as c:
            rows = c.execute("SELECT id FROM runs WHERE id >= ? AND id < ? ORDER BY id "
                             "LIMIT ?", (prefix.upper(), prefix.upper() + "\uffff",
                                         limit)).fetchall()
        return [r[0] for r in rows]

    # ── plumbing ────────────────────────────────────────────────────────────

    @property
    def _sync(self) -> str:
        return "FULL" if self.durable else "NORMAL"

    def _configure(self) -> None:
        with self._errors("configuring"):
            c = self._conn
            c.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = c.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StateError(f"the state store {self.path} cannot use WAL mode (got "
                                 f"{mode!r}); put the state folder on a local file system")
            c.execute(f"PRAGMA synchronous = {self._sync}")
            c.execute("PRAGMA foreign_keys = ON")

    def _migrate(self) -> None:
        with self._errors("upgrading its schema"):
            c = self._conn
            if self._user_version() == SCHEMA_VERSION:
                return
            c.execute("BEGIN IMMEDIATE")
            try:
                # Read again under the write lock: another process may have just migrated.
                version = self._user_version()
                if version > SCHEMA_VERSION:
                    raise StateError(f"the state store {self.path} has schema version "
                                     f"{version}, newer than this opsrun knows "
                                     f"({SCHEMA_VERSION}); upgrade opsrun")
                for statements in MIGRATIONS[version:]:
                    for statement in statements:
                        c.execute(statement)
                c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")

    def _user_version(self) -> int:
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            raise _state_error(self.path, doing, e) from e

    @contextmanager
    def _read(self, doing: str) -> Iterator[sqlite3.Connection]:
        with self._lock, self._errors(doing):
            yield self._conn

    @contextmanager
    def _write(self, doing: str) -> Iterator[sqlite3.Connection]:
        with self._lock, self._errors(doing):
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")


def new_run_id() -> str:
    """A new run id: a ULID (26 characters, sorts by creation time, millisecond prefix)."""
    return new_id()


def _state_error(path: Path, doing: str, e: sqlite3.Error) -> StateError:
    hint = "check the permissions of the state folder and that the disk is not full"
    if "locked" in str(e) or "busy" in str(e):
        hint = (f"another opsrun held it for more than {BUSY_TIMEOUT_MS // 1000}s; "
                "try again")
    elif "readonly" in str(e) or "read-only" in str(e):
        hint = "the state folder or state.db is read-only for this user"
    elif _disk_full(path.parent):  # SQLite may call it only "disk I/O error"
        hint = "the disk holding the state folder is full: free some space"
    elif resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        hint = ("check that the disk is not full and that the file size limit (ulimit -f) "
                "leaves room for state.db to grow")
    return StateError(f"state store {path}: {doing} failed: {e}; {hint}")


def _disk_full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) == 0


def _check_state(state: str) -> None:
    if state not in RUN_STATES:
        raise ValueError(f"unknown run state {state!r}; expected one of {sorted(RUN_STATES)}")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _ts(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("times given to the store must be timezone-aware")
    # isoformat, not strftime: the same text, several times faster on the hot path of runs
    return value.astimezone(timezone.utc).replace(tzinfo=None).isoformat(
        timespec="microseconds") + "Z"


def _dt(text: str | None) -> datetime | None:
    if text is None:
        return None
    # fromisoformat, not strptime: no _strptime import at start-up, and faster
    return datetime.fromisoformat(text.removesuffix("Z")).replace(tzinfo=timezone.utc)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def _tail(text: str) -> str:
    data = text.encode("utf-8", "surrogateescape")
    if len(data) <= MAX_OUTPUT_BYTES:
        return text
    # Cutting may split a character; drop its orphaned continuation bytes.
    return data[-MAX_OUTPUT_BYTES:].decode("utf-8", "ignore")


_RUN_COLUMNS = ("id, runbook, runbook_path, runbook_sha256, state, event, params, started_by, "
                "started_uid, trigger, created_at, started_at, finished_at, exit_code, error, "
                "current_step, retry_attempt, retry_at")
_STEP_COLUMNS = ("run_id, idx, step_id, attempt, outcome, started_at, finished_at, exit_code, "
                 "stdout_tail, stderr_tail, outputs, hosts, sub")
_RUN_ENDED = ("SELECT 1 FROM runs WHERE runs.id = approvals.run_id AND runs.state IN "
              f"({', '.join('?' * len(FINAL_RUN_STATES))})")
_APPROVAL_COLUMNS = ("id, run_id, step_id, question, approvers, starter, asked_at, deadline, "
                     "answer, answered_by, answered_uid, comment, how, answered_at")


_THROTTLE_COLUMNS = ("runbook, key, mode, opened_at, until, events, first_event_id, "
                     "last_event_id, trigger, last_event")


def _window(r: Sequence[Any]) -> Window:
    return Window(r[0], r[1], r[2], float(r[3]), float(r[4]), int(r[5]), r[6], r[7], r[8],
                  None if r[9] is None else json.loads(r[9]))


def _run(r: Sequence[Any]) -> RunRecord:
    created = _dt(r[10])
    assert created is not None
    return RunRecord(r[0], r[1], r[2], r[3], r[4], None if r[5] is None else json.loads(r[5]),
                     json.loads(r[6]), r[7], r[8], r[9], created, _dt(r[11]), _dt(r[12]),
                     r[13], r[14], r[15], r[16], r[17])


def _step(r: Sequence[Any]) -> StepRecord:
    return StepRecord(r[0], r[1], r[2], r[3], r[4], _dt(r[5]), _dt(r[6]), r[7], r[8], r[9],
                      json.loads(r[10]), json.loads(r[11]), r[12])


def _approval(r: Sequence[Any]) -> ApprovalRecord:
    asked = _dt(r[6])
    assert asked is not None
    return ApprovalRecord(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], asked, _dt(r[7]),
                          r[8], r[9], r[10], r[11], r[12], _dt(r[13]))


_NOTIFY_COLUMNS = ("id, run_id, event, target, message, wait_step, created_at, due_at, "
                   "attempts, state, last_error")


def _notification(r: Sequence[Any]) -> Notification:
    created = _dt(r[6])
    assert created is not None
    return Notification(r[0], r[1], r[2], json.loads(r[3]), json.loads(r[4]), r[5], created,
                        float(r[7]), int(r[8]), r[9], r[10])


def _queued(r: Sequence[Any]) -> QueuedEvent:
    enqueued = _dt(r[2])
    assert enqueued is not None
    return QueuedEvent(r[0], json.loads(r[1]), enqueued, json.loads(r[3]))
