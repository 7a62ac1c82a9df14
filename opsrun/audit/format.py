"""The audit log's file format, shared by its writer, its readers and its verifier.

A record is one line of ASCII JSON that always begins with its chain fields in a fixed
order, so that a verifier can read them without parsing the whole line:

    {"v":1,"seq":42,"prev":"<sha256 hex of line 41>","time":"2025-01-02T03:04:05.123456Z",
     "kind":"run.started","run_id":…,"runbook":{…},"user":…,"uid":…,"host":…,"pid":…,
     <the kind's own fields, sorted by name>}

`prev` is the sha256 of the previous record's line (without its newline); the first record
of the log has 64 zeros. Nested objects have sorted keys, so a record's bytes are a
function of its content. Non-ASCII text is escaped, so the file is safe to `cat`.

Segments: when the log passes its size limit, it is renamed to `audit-<n>.jsonl` and a
new `audit.jsonl` begins with an `audit.segment_started` record that names the previous
segment and chains to its last record.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple, Union

from opsrun.digest import sha256_hex

FORMAT_VERSION = 1
GENESIS = "0" * 64

SEGMENT_STARTED = "audit.segment_started"
RESERVED_FIELDS = frozenset({"v", "seq", "prev", "time", "kind", "run_id", "runbook", "user",
                             "uid", "host", "pid"})

HEADER_PREFIX = b'{"v":1,"seq":'


class RunbookRef(NamedTuple):
    """What the audit log says about a runbook: its name, file and the sha256 of its bytes."""

    name: str
    path: str | None = None
    sha256: str | None = None


RunbookLike = Union[RunbookRef, Mapping[str, Any]]


def line_hash(line: bytes) -> str:
    """The chain hash of a record line (its bytes without the newline)."""
    return sha256_hex(line)


def parse_header(line: bytes) -> tuple[int, str] | None:
    """Read (seq, prev) from the fixed start of a record line; None if it is not one."""
    if not line.startswith(HEADER_PREFIX):
        return None
    comma = line.find(b",", 13, 40)
    digits = line[13:comma]
    if comma < 0 or not digits.isdigit() or (digits[0] == 48 and len(digits) > 1):
        return None
    if line[comma + 1:comma + 9] != b'"prev":"' or line[comma + 73:comma + 75] != b'",':
        return None
    return int(digits), line[comma + 9:comma + 73].decode("ascii", "replace")


def is_record(line: bytes) -> bool:
    """Whether a line is a complete record: the fixed header and a whole JSON object."""
    if parse_header(line) is None or not line.endswith(b"}"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def looks_torn(line: bytes) -> bool:
    """Whether a line that is not a record looks like what a crash leaves behind.

    That is the start of a record cut short, or the NUL bytes a file system may leave
    where data had not reached the disk.
    """
    if not line:
        return False
    if line.strip(b"\0") == b"":
        return True
    head = line[:len(HEADER_PREFIX)]
    return HEADER_PREFIX.startswith(head) or line.startswith(HEADER_PREFIX)


def segment_path(path: Path, number: int) -> Path:
    """The name segment `number` of the log at `path` gets once closed: audit-<n>.jsonl."""
    return path.with_name(f"{_stem(path)}-{number}{path.suffix}")


def list_segments(path: Path) -> list[tuple[int, Path]]:
    """The closed segments of the log at `path`, oldest first, as (number, file)."""
    pattern = re.compile(rf"^{re.escape(_stem(path))}-([1-9][0-9]*){re.escape(path.suffix)}$")
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), path.parent / n) for n in names if (m := pattern.match(n))]
    return sorted(found)


def lock_path_for(path: Path) -> Path:
    """The lock file that writers of the log at `path` hold: `<log>.lock`."""
    return path.with_name(path.name + ".lock")


def rfc3339(t: float) -> str:
    """A Unix time as the audit log writes times: RFC 3339, UTC, microseconds."""
    return datetime.fromtimestamp(t, timezone.utc).replace(tzinfo=None).isoformat(
        timespec="microseconds") + "Z"


def _stem(path: Path) -> str:
    return path.name[:-len(path.suffix)] if path.suffix else path.name
