"""`opsrun audit verify | show | tail | head | prune`: read, check and retire the audit log.

Record contents are shown with control characters escaped (`\\x1b`, `\\u202e`), so a field
that holds terminal escape sequences cannot repaint or hide anything on the screen.
"""
from __future__ import annotations

import json
import os
import re
import sys
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from opsrun import exit_codes, paths
from opsrun.audit import read
from opsrun.audit.log import AuditLog
from opsrun.audit.verify import Finding, VerifyResult, verify_log
from opsrun.errors import StateError, UsageError
from opsrun.store import Store
from opsrun.terminal_text import safe

JSON_VERSION = 1
_HEADER_KEYS = ("v", "seq", "prev", "time", "kind", "run_id", "runbook", "user", "uid",
                "host", "pid")
_HEAD = re.compile(r"^(\d+):([0-9a-fA-F]{64})$")


def verify(state_dir: str | None, audit_log: str | None, from_start: bool,
           head: str | None, as_json: bool) -> int:
    """Verify the chain; exit 0 if it holds (warnings allowed), 1 if it was tampered with."""
    given = _parse_head(head) if head else None
    log_path, store, notes = _open(state_dir, audit_log)
    try:
        result = verify_log(log_path, store=store, head=given, from_start=from_start)
    finally:
        if store is not None:
            store.close()
    result.warnings[:0] = [Finding("no_state_store", n) for n in notes]
    if as_json:
        _print_json({"log": str(log_path), **result.to_json()})
    else:
        _print_verify(log_path, result)
    return int(exit_codes.OK if result.ok else exit_codes.RUN_FAILED)


def prune(state_dir: str | None, audit_log: str | None, before: str | None,
          keep: int | None, dry_run: bool, as_json: bool) -> int:
    """Retire the oldest closed segments, recorded in the chain so that verify accepts it."""
    from opsrun.audit import prune as audit_prune
    from opsrun.runs.context import open_run_context

    if before is None and keep is None:
        raise UsageError("say which segments go: --before DATE|DURATION (those whose last "
                         "record is older) and/or --keep N (all but the newest N)")
    when = _parse_since(before) if before else None
    log_path = _log_path(state_dir, audit_log)
    with _reading(log_path):
        chosen = audit_prune.plan(log_path, before=when, keep=keep)
    record: dict[str, Any] = {}
    if chosen and not dry_run:
        with open_run_context(state_dir, str(log_path), {}) as rc:
            record = audit_prune.prune(rc.audit, rc.store, chosen)
    if as_json:
        _print_json({"log": str(log_path), "dry_run": dry_run,
                     "segments": [vars(c) for c in chosen],
                     "record_seq": record.get("seq")})
        return int(exit_codes.OK)
    if not chosen:
        print(f"nothing to prune in {log_path}: no closed segment is old enough (the newest "
              "closed one always stays)")
        return int(exit_codes.OK)
    verb = "would remove" if dry_run else "removed"
    for c in chosen:
        print(f"{verb} {c.name}: seq {c.first_seq} to {c.last_seq}, {c.records} records, "
              f"last at {c.last_time}")
    if not dry_run:
        print(f"recorded as audit.pruned (seq {record.get('seq')}); the log now begins with "
              f"segment {chosen[-1].number + 1}. Keep a new head: opsrun audit head")
    return int(exit_codes.OK)


def head(state_dir: str | None, audit_log: str | None, as_json: bool) -> int:
    """Print the last record's `SEQ:HASH`, to be kept somewhere this machine cannot change."""
    log_path, store, _ = _open(state_dir, audit_log)
    try:
        with _reading(log_path):
            tip = AuditLog(log_path).head()
        stored = None if store is None else store.get_audit_head(str(log_path))
    finally:
        if store is not None:
            store.close()
    if tip is None:
        raise StateError(f"the audit log {log_path} has no records yet: nothing was recorded "
                         "there (--state-dir or --audit-log picks another log)")
    if stored is not None and (stored.seq > tip.seq or
                               (stored.seq == tip.seq and stored.hash != tip.hash)):
        print(f"opsrun: warning: the state store recorded seq {stored.seq}, which the log "
              "does not end with; run `opsrun audit verify` before keeping this head",
              file=sys.stderr)
    if as_json:
        _print_json({"log": str(log_path), "segment": tip.segment, "seq": tip.seq,
                     "hash": tip.hash, "head": f"{tip.seq}:{tip.hash}"})
    else:
        print(f"{tip.seq}:{tip.hash}")
    return int(exit_codes.OK)


def show(state_dir: str | None, audit_log: str | None, run: str | None,
         runbook: str | None, kind: str | None, since: str | None,
         limit: int | None, as_json: bool) -> int:
    """Print the records that match every filter given, oldest first (the last `limit`)."""
    log_path = _log_path(state_dir, audit_log)
    after = _parse_since(since).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if since else None
    _note_if_missing(log_path)
    if limit is not None and limit < 1:
        raise UsageError("--limit must be 1 or more")
    needles = [b'"run_id":' + json.dumps(run).encode() if run else b"",
               b'"kind":' + json.dumps(kind).encode() if kind and not _is_glob(kind) else b""]
    picked: deque[dict[str, Any]] = deque(maxlen=limit)
    skipped = 0
    with _reading(log_path):
        for line in read.all_lines(log_path):
            if not all(n in line for n in needles):
                continue
            record = read.record(line)
            if record is None:
                skipped += 1
            elif _matches(record, run, runbook, kind, after):
                picked.append(record)
    _print_records(list(picked), as_json, header=True)
    if skipped:
        print(f"opsrun: {skipped} line(s) that are not complete records were skipped; "
              "run `opsrun audit verify`", file=sys.stderr)
    return int(exit_codes.OK)


def tail(state_dir: str | None, audit_log: str | None, follow: bool, lines: int = 10,
         as_json: bool = False, poll_s: float = 0.2,
         stop: threading.Event | None = None) -> int:
    """Print the last `lines` records; with `follow`, keep printing new ones as they come."""
    log_path = _log_path(state_dir, audit_log)
    if not follow:
        _note_if_missing(log_path)
    with _reading(log_path):
        # Open the file to follow first, and show the last records up to where it stands:
        # what is appended meanwhile is then printed once, by the follower.
        f = read.open_at_end(log_path) if follow else None
        found = read.last_lines(log_path, lines, None if f is None else f.tell())
        records = [r for r in (read.record(x) for x in found) if r is not None]
        _print_records(records, as_json, header=True)
        sys.stdout.flush()
        if follow:
            _print_followed(read.follow(log_path, f, poll_s, stop or threading.Event()),
                            as_json)
    return int(exit_codes.OK)


# ── reading the log ──────────────────────────────────────────────────────────


@contextmanager
def _reading(log_path: Path) -> Iterator[None]:
    """Turn a log that cannot be read into one clear error."""
    try:
        yield
    except OSError as e:
        raise StateError(f"cannot read the audit log {e.filename or log_path}: "
                         f"{e.strerror or e}; check its permissions (or run as its owner)"
                         ) from e


def _log_path(state_dir: str | None, audit_log: str | None) -> Path:
    if audit_log:
        return Path(os.path.abspath(Path(audit_log).expanduser()))
    folder = paths.state_dir_from_env(state_dir)
    paths.check_trusted(folder)  # a log someone else could swap is no evidence
    return Path(os.path.abspath(folder / paths.AUDIT_LOG))


def _open(state_dir: str | None, audit_log: str | None
          ) -> tuple[Path, Store | None, list[str]]:
    """The log's path and the state store that keeps its head, if there is one to open."""
    log_path = _log_path(state_dir, audit_log)
    folder = paths.state_dir_from_env(state_dir)
    if not (folder / paths.STATE_DB).exists():
        return log_path, None, [f"no state store at {folder / paths.STATE_DB}: records cut "
                                "from the end of the log cannot be detected (use --head)"]
    try:
        return log_path, Store.open(folder), []
    except StateError as e:
        return log_path, None, [f"the state store could not be opened ({e}): records cut "
                                "from the end of the log cannot be detected (use --head)"]


def _note_if_missing(log_path: Path) -> None:
    if not any(f.exists() for f in read.files(log_path)):
        print(f"opsrun: there is no audit log at {log_path} yet", file=sys.stderr)


def _print_followed(lines: Iterator[bytes | None], as_json: bool) -> None:
    for line in lines:
        if line is None:
            print("(an incomplete record at the end of a segment was skipped)",
                  file=sys.stderr)
            continue
        record = read.record(line)
        if record is None:
            print("(a line that is not a complete record was skipped)", file=sys.stderr)
        else:
            _print_records([record], as_json, header=False)
        sys.stdout.flush()


def _matches(record: dict[str, Any], run: str | None, runbook: str | None,
             kind: str | None, after: str | None) -> bool:
    if run is not None and record.get("run_id") != run:
        return False
    if runbook is not None and (record.get("runbook") or {}).get("name") != runbook:
        return False
    if kind is not None and not fnmatchcase(str(record.get("kind")), kind):
        return False
    return after is None or str(record.get("time", "")) >= after


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _parse_since(text: str) -> datetime:
    """`1h`, `30m`, `2d` ago, or an ISO date or time (UTC unless it says otherwise)."""
    from opsrun.durations import DurationError, parse_duration

    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    except ValueError:
        pass
    try:
        return datetime.now(timezone.utc) - timedelta(seconds=parse_duration(text))
    except DurationError:
        raise UsageError(f"--since {text!r} is neither a duration nor a date; write e.g. 1h, "
                         "30m, 2d, 2025-01-31 or 2025-01-31T08:00:00Z") from None


def _parse_head(text: str) -> tuple[int, str]:
    m = _HEAD.match(text.strip())
    if not m:
        raise UsageError(f"--head {text!r} is not SEQ:HASH; give what `opsrun audit head` "
                         "printed, e.g. 1042:3f5a…(64 hex digits)")
    return int(m.group(1)), m.group(2).lower()


# ── printing ─────────────────────────────────────────────────────────────────


def _print_json(value: Any) -> None:
    print(json.dumps({"v": JSON_VERSION, **value}, indent=2, sort_keys=False))


def _print_verify(log_path: Path, r: VerifyResult) -> None:
    for note in r.notes:
        print(f"note: {_safe(note.message)}")
    for w in r.warnings:
        print(f"warning: {_safe(w.message)}")
    where = f"{len(r.segments)} file(s)" if r.segments else "no files"
    if r.problem is None:
        print(f"verified: {log_path}: {r.records} records in {where}, last seq {r.last_seq}")
        if r.records:
            print(f"head: {r.last_seq}:{r.last_hash}")
    else:
        p = r.problem
        print(f"TAMPERING ({p.reason}): {_safe(p.message)}")
        if p.file:
            loc = f"{p.file}:{p.line}" if p.line else p.file
            print(f"  at {loc}" + (f" (seq {p.seq})" if p.seq is not None else ""))
        print(f"  {r.records} record{'s' * (r.records != 1)} before it verified "
              f"(last good seq {r.last_seq})")
        print("  keep the file as it is, find out who changed it, and compare it with a "
              "backup or a head kept elsewhere (opsrun audit head)")
    for label in r.heads_checked:
        print(f"checked against {label}")


def _print_records(records: list[dict[str, Any]], as_json: bool, header: bool) -> None:
    if as_json:
        for r in records:
            print(json.dumps(r, separators=(",", ":"), ensure_ascii=True))
        return
    if header and records:
        print(_row("SEQ", "TIME", "KIND", "RUN", "RUNBOOK", "USER", "DETAILS"))
    for r in records:
        book = (r.get("runbook") or {}).get("name") or "-"
        details = " ".join(f"{k}={_short(v)}" for k, v in r.items() if k not in _HEADER_KEYS)
        print(_row(str(r.get("seq")), str(r.get("time", ""))[:19].replace("T", " "),
                   _safe(str(r.get("kind"))), _safe(str(r.get("run_id") or "-")),
                   _safe(str(book)), _safe(str(r.get("user"))), details))


def _row(*cells: str) -> str:
    widths = (8, 19, 22, 26, 20, 10)
    return (" ".join(c.ljust(w) for c, w in zip(cells, widths)) + " " + cells[-1]).rstrip()


def _short(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = _safe(text)
    return text if len(text) <= width else text[:width - 1] + "…"


def _safe(text: str) -> str:
    return safe(text, keep_newlines=False)
