"""Retiring old audit segments so that `opsrun audit verify` still accepts the log.

A segment is never just deleted: the log is verified first (a log that does not verify is
evidence and is left alone), then an `audit.pruned` record goes into the chain naming
every segment removed — its number, name, first and last seq, the hash of its last record,
its size and sha256 — and only then, under the writers' lock, are the files removed,
oldest first. The verifier takes the oldest segment left as the start of the log when an
`audit.pruned` record in the log names the segment before it and its last hash is the one
the segment chains to; a missing segment that no such record explains stays tampering.

Only closed segments go, oldest first and without gaps, and the newest closed one always
stays: the current file's number follows from it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from opsrun import file_lock
from opsrun.audit.format import (
    is_record,
    list_segments,
    lock_path_for,
    parse_header,
    rfc3339,
)
from opsrun.audit.log import AuditLog, fsync_dir
from opsrun.audit.verify import verify_log
from opsrun.errors import StateError, UsageError
from opsrun.store import Store

PRUNED = "audit.pruned"


@dataclass(frozen=True)
class Segment:
    """A closed segment as the prune record describes it."""

    number: int
    name: str
    first_seq: int
    last_seq: int
    last_hash: str
    last_time: str
    records: int
    size: int
    sha256: str


def plan(log_path: Path, *, before: datetime | None, keep: int | None) -> list[Segment]:
    """The closed segments to remove: the oldest ones, up to (not including) the newest.

    `before`: those whose last record is older; `keep`: all but the newest `keep`.
    """
    if keep is not None and keep < 1:
        raise UsageError("--keep must be 1 or more: the newest closed segment always stays, "
                         "since the current file goes on from it")
    closed = list_segments(log_path)[:-1]  # the newest closed segment stays
    if keep is not None:
        closed = closed[:max(0, len(closed) - (keep - 1))]
    stamp = None if before is None else rfc3339(before.timestamp())
    chosen: list[Segment] = []
    for number, path in closed:
        segment = describe(number, path)
        if stamp is not None and segment.last_time >= stamp:
            break
        chosen.append(segment)
    return chosen


def prune(log: AuditLog, store: Store | None, segments: list[Segment]) -> dict[str, Any]:
    """Record the removal of `segments` in the chain, then remove them; return the record.

    Refuses (StateError) when the log does not verify: then it must be kept as it is.
    """
    result = verify_log(log.path, store=store)
    if not result.ok:
        problem = result.problem
        raise StateError(f"the audit log {log.path} does not verify ("
                         f"{problem.reason if problem else '?'}: "
                         f"{problem.message if problem else ''}); nothing was pruned: keep it "
                         "as it is and find out what happened first")
    if not segments:
        return {}
    last = segments[-1]
    record = log.append(PRUNED, segments=[asdict(s) for s in segments],
                        first_kept_segment=last.number + 1,
                        chain={"segment": last.number, "seq": last.last_seq,
                               "hash": last.last_hash})
    with file_lock.locked_path(lock_path_for(log.path), timeout_s=30.0):
        for s in segments:  # oldest first: a crash leaves a log that starts later, still explained
            try:
                (log.path.parent / s.name).unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                raise StateError(f"cannot remove {log.path.parent / s.name}: {e.strerror}; "
                                 "its removal is recorded, so run the prune again once it "
                                 "can be removed") from e
        fsync_dir(log.path.parent)
    if store is not None:
        store.forget_audit_checkpoints(str(log.path), [s.number for s in segments])
    return record


def describe(number: int, path: Path) -> Segment:
    """Read a closed segment whole: its records, digest and last record."""
    digest, size, records = hashlib.sha256(), 0, 0
    first_seq, last_line, carry = 0, b"", b""
    try:
        with open(path, "rb") as f:
            while chunk := f.read(4 << 20):
                digest.update(chunk)
                size += len(chunk)
                lines = (carry + chunk).split(b"\n")
                carry = lines.pop()
                for line in lines:
                    header = parse_header(line)
                    if header is None:
                        continue
                    records += 1
                    first_seq = first_seq or header[0]
                    last_line = line
    except OSError as e:
        raise StateError(f"cannot read the audit segment {path}: {e.strerror}") from e
    if not is_record(last_line):
        raise StateError(f"the audit segment {path} has no complete last record; run "
                         "`opsrun audit verify`")
    header = parse_header(last_line)
    assert header is not None
    last = json.loads(last_line)
    return Segment(number, path.name, first_seq, header[0], hashlib.sha256(last_line).hexdigest(),
                   str(last.get("time", "")), records, size, digest.hexdigest())
