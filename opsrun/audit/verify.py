"""Verify an audit log: walk every segment's hash chain and sequence, name the first break.

The walk reads each line's `seq` and `prev` from its fixed header and hashes the raw line,
without parsing JSON, so a million records take a few seconds. Only where the chain breaks
(and at each segment's first record) is a line parsed, to say what happened there:

- altered:   a record's bytes changed, so the next record's `prev` no longer matches;
- removed:   records are missing (a gap in `seq`), or the tail is shorter than the head
             kept in the state store (or given with --head);
- inserted:  a record that the chain steps over, or a line that is no record at all;
- reordered: records out of `seq` order;
- segment_missing: a segment file named by its successor is not there, and no
             `audit.pruned` record in the log explains it (see audit_prune).

A line cut short by a crash is not tampering: an incomplete last line, or a torn line that
the next record chains past (the writer after a crash does exactly that), is a warning.

Closed segments that verified before are remembered in the state store by size and
sha256; a later run only hashes those files whole instead of walking them line by line,
unless `from_start` is set. Any change to such a file changes its digest, and it is walked.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from opsrun.audit.format import (
    GENESIS,
    SEGMENT_STARTED,
    is_record,
    list_segments,
    looks_torn,
    parse_header,
)
from opsrun.audit.log import permission_problem, reading_lock
from opsrun.errors import StateError
from opsrun.store import AuditCheckpoint, Store

_CHUNK = 4 * 1024 * 1024
_REORDER_WINDOW = 1000  # lines searched ahead for a record that was moved


@dataclass(frozen=True)
class Finding:
    """A problem or warning, located by file, line (1-based) and seq where known."""

    reason: str
    message: str
    file: str | None = None
    line: int | None = None
    seq: int | None = None


@dataclass
class VerifyResult:
    """What `verify_log` found; `ok` is False only when tampering (or loss) was found."""

    ok: bool
    records: int
    segments: list[str]
    last_seq: int
    last_hash: str
    problem: Finding | None
    warnings: list[Finding] = field(default_factory=list)
    heads_checked: list[str] = field(default_factory=list)
    notes: list[Finding] = field(default_factory=list)  # neither problems nor warnings: prunes

    def to_json(self) -> dict[str, Any]:
        """A plain dict for --json output."""
        return asdict(self)


@dataclass
class _Pos:
    file: str
    line: int


@dataclass
class _File:
    """One file of the log, opened while writers were held off, and its size then."""

    number: int
    path: Path
    handle: BinaryIO
    size: int


def verify_log(path: Path, *, store: Store | None = None, head: tuple[int, str] | None = None,
               from_start: bool = False) -> VerifyResult:
    """Verify the log at `path` (all its segments) against the store's head and `head`."""
    try:
        return _Verifier(Path(path), store, head, from_start).run()
    except OSError as e:
        raise StateError(f"cannot read the audit log {e.filename or path}: "
                         f"{e.strerror or e}; check its permissions (or run as its owner)"
                         ) from e


class _Verifier:
    def __init__(self, path: Path, store: Store | None, head: tuple[int, str] | None,
                 from_start: bool) -> None:
        self.path = path
        self.store = store
        self.from_start = from_start
        self.warnings: list[Finding] = []
        self.problem: Finding | None = None
        self.seq, self.hash, self.before = 0, GENESIS, GENESIS
        self.last_pos: _Pos | None = None
        self.last_line = b""
        self.records = 0
        self.torn: list[tuple[_Pos, bool]] = []  # crash remnants waiting for the next record
        self.heads: dict[int, list[tuple[str, str]]] = {}
        self.labels: list[str] = []
        self.given_head = head
        self.current: _File | None = None
        self.prunes: list[dict[str, Any]] = []  # audit.pruned records of the log
        self.notes: list[Finding] = []
        self.pruned_seq = 0  # the log starts after this seq (its older segments were pruned)

    def _expect(self, seq: int, digest: str, label: str) -> None:
        self.heads.setdefault(seq, []).append((digest.lower(), label))
        self.labels.append(f"{label} (seq {seq})")

    def run(self) -> VerifyResult:
        # Open every file and read the store's head while writers wait, so that a rotation
        # or an append during the walk cannot look like a missing segment or a torn line.
        with reading_lock(self.path):
            files = self._snapshot()
            head = None if self.store is None else self.store.get_audit_head(str(self.path))
        try:
            if head is not None:
                self._expect(head.seq, head.hash, "the state store's head")
            if self.given_head is not None:
                self._expect(*self.given_head, "the given --head")
            self._verify(files)
        finally:
            for f in files:
                f.handle.close()
        if self.store is not None and head is None and self.given_head is None and self.records:
            # The store keys heads by the log's path: a log (or a state folder) moved or
            # copied elsewhere verifies without its tail check, which must not pass silently.
            self.warnings.append(Finding(
                "no_store_head", f"the state store {self.store.path} keeps no head for "
                f"{self.path} (was the log or the state folder moved?): records cut from the "
                "end of the log cannot be detected; check against a saved head with --head",
                str(self.path)))
        return VerifyResult(self.problem is None, self.records, [f.path.name for f in files],
                            self.seq, self.hash, self.problem, self.warnings, self.labels,
                            self.notes)

    def _snapshot(self) -> list[_File]:
        found = list_segments(self.path)
        found.append((found[-1][0] + 1 if found else 1, self.path))
        files = []
        for number, path in found:
            try:
                handle = open(path, "rb")
            except FileNotFoundError:
                continue
            files.append(_File(number, path, handle, os.fstat(handle.fileno()).st_size))
        return files

    def _verify(self, files: list[_File]) -> None:
        checkpoints = {} if self.store is None else self.store.audit_checkpoints(str(self.path))
        if files and files[0].number > 1:
            self.prunes = _prune_records(files)
        previous_name: str | None = None
        for f in files:
            problem = permission_problem(f.path)
            if problem:
                self.warnings.append(Finding("permissions", problem, str(f.path)))
            closed = f.path != self.path
            saved = None if self.from_start or not closed else checkpoints.get(f.number)
            if not (saved and self._skip(f, saved, previous_name)):
                self._walk(f, previous_name, closed)
            if self.problem:
                return
            previous_name = f.path.name
        self._finish(files)

    # ── one file ───────────────────────────────────────────────────────────

    def _walk(self, f: _File, previous_name: str | None, closed: bool) -> None:
        file, number = f.path, f.number
        self.current = f
        digest = hashlib.sha256() if closed and self.store is not None else None
        start = (self.seq, self.hash, self.records, len(self.warnings))
        first: tuple[int, str, dict[str, Any] | None] | None = None
        name, heads, sha256 = str(file), self.heads, hashlib.sha256
        line_no = 0
        # The hot loop keeps the chain in locals and compares each line with the header it
        # must start with; anything else goes to the careful (slow) path.
        seq, digest_hex, before = self.seq, self.hash.encode(), self.before.encode()
        expect = b'{"v":1,"seq":%d,"prev":"%s",' % (seq + 1, digest_hex)
        good = 0  # records accepted by the hot loop since the state was last saved
        last_line = self.last_line
        last_no = 0
        for line_no, line, whole in _lines(f, digest):
            if line_no == 1 or self.torn or not (
                    whole and line.startswith(expect) and line.endswith(b"}")):
                self._save_state(seq, digest_hex, before, good, last_line, name, last_no)
                good = 0
                if line_no == 1 and (number > 1 or not line.startswith(b'{"v":1,"seq":1,')):
                    first = self._segment_start(file, number, line, previous_name)
                if not self.problem:
                    self._slow(file, line_no, line, whole)
                if self.problem:
                    return
                seq, digest_hex, before = self.seq, self.hash.encode(), self.before.encode()
                last_line, last_no = self.last_line, line_no
                expect = b'{"v":1,"seq":%d,"prev":"%s",' % (seq + 1, digest_hex)
                continue
            seq += 1
            before, digest_hex = digest_hex, sha256(line).hexdigest().encode()
            good += 1
            last_line, last_no = line, line_no
            expect = b'{"v":1,"seq":%d,"prev":"%s",' % (seq + 1, digest_hex)
            if seq in heads:
                self._save_state(seq, digest_hex, before, good, last_line, name, last_no)
                good = 0
                self._check_head(seq, name, line_no)
                if self.problem:
                    return
        self._save_state(seq, digest_hex, before, good, last_line, name, last_no)
        if digest is not None and self.problem is None:
            self._save(f, digest.hexdigest(), start, first, line_no)

    def _save_state(self, seq: int, digest_hex: bytes, before: bytes, good: int,
                    last_line: bytes, name: str, last_no: int) -> None:
        if not good:
            return
        self.seq, self.hash, self.before = seq, digest_hex.decode(), before.decode()
        self.records += good
        self.last_line, self.last_pos = last_line, _Pos(name, last_no)

    def _slow(self, file: Path, n: int, line: bytes, whole: bool) -> None:
        """Check one line carefully: accept it, or work out what went wrong."""
        hdr = parse_header(line) if whole else None
        if (hdr is not None and hdr == (self.seq + 1, self.hash) and line.endswith(b"}")
                and not self.torn):
            self._accept(file, n, line, hdr[0])
        else:
            self._mismatch(file, n, line, whole, hdr)

    def _accept(self, file: Path, n: int, line: bytes, seq: int) -> None:
        self.before, self.hash, self.seq = self.hash, hashlib.sha256(line).hexdigest(), seq
        self.records += 1
        self.last_line, self.last_pos = line, _Pos(str(file), n)
        if seq in self.heads:
            self._check_head(seq, str(file), n)

    def _segment_start(self, file: Path, number: int, line: bytes,
                       previous_name: str | None) -> tuple[int, str, dict[str, Any] | None]:
        """Check that a segment begins by naming the one before it, which must be there."""
        hdr = parse_header(line) or (0, "")
        record = json.loads(line) if is_record(line) else None
        if record is None or record.get("kind") != SEGMENT_STARTED:
            if number > 1:
                self._fail("altered", f"{file.name} does not begin with an "
                           f"{SEGMENT_STARTED} record, as every segment after the first must",
                           file, 1, hdr[0] or None)
            return hdr[0], hdr[1], record
        named = record.get("previous_segment")
        if named != previous_name and previous_name is None and \
                self._pruned_before(file, number, named, hdr):
            return hdr[0], hdr[1], record
        if named != previous_name:
            where = (f"between {previous_name} and {file.name}" if previous_name
                     else f"before {file.name}, where the log now begins")
            self._fail("segment_missing", f"segment {named} is missing {where}: the first "
                       f"record of {file.name} (seq {hdr[0]}) continues from it", file, 1,
                       hdr[0])
        elif record.get("segment") != number:
            self._fail("altered", f"{file.name} says it is segment {record.get('segment')}, "
                       f"but its place makes it segment {number}: segment files were renamed",
                       file, 1, hdr[0])
        return hdr[0], hdr[1], record

    def _pruned_before(self, file: Path, number: int, named: Any,
                       hdr: tuple[int, str]) -> bool:
        """Whether an audit.pruned record explains where the log now begins; if so, the
        chain starts from the last record of the pruned segment it names."""
        for record in reversed(self.prunes):
            for s in record.get("segments") or []:
                if not isinstance(s, dict) or s.get("number") != number - 1:
                    continue
                if s.get("name") != named or (s.get("last_seq"), s.get("last_hash")) != (
                        hdr[0] - 1, hdr[1]):
                    continue
                self.seq, self.hash, self.before = hdr[0] - 1, hdr[1], ""
                self.pruned_seq = hdr[0] - 1
                removed = record["segments"]
                first = removed[0] if isinstance(removed[0], dict) else {}
                self.notes.append(Finding(
                    "pruned", f"the log begins with {file.name} at seq {hdr[0]}: segments "
                    f"up to {named} (seq {first.get('first_seq', '?')} to {hdr[0] - 1}) were "
                    f"pruned by {record.get('user')} at {record.get('time')} "
                    f"(audit.pruned, seq {record.get('seq')})", str(file), 1, hdr[0]))
                return True
        return False

    def _mismatch(self, file: Path, n: int, line: bytes, whole: bool,
                  hdr: tuple[int, str] | None) -> None:
        if hdr is None or not whole or not is_record(line):
            if (not whole or looks_torn(line)) and len(self.torn) < 16:
                self.torn.append((_Pos(str(file), n), whole))
                return
            self._fail("inserted" if hdr is None else "altered",
                       f"line {n} of {file.name} is not an audit record" if hdr is None else
                       f"record seq {hdr[0]} at line {n} of {file.name} is not valid JSON",
                       file, n, hdr[0] if hdr else None)
            return
        seq, prev = hdr
        if self.torn:
            self._after_torn(file, n, seq, prev)
            if not (self.problem or self.torn):
                self._accept(file, n, line, seq)
            return
        expected = self.seq + 1
        if seq == expected:
            self._changed(file, n, seq)
        elif seq > expected:
            self._ahead(file, n, line, seq, prev)
        else:
            self._behind(file, n, line, seq, prev)

    def _after_torn(self, file: Path, n: int, seq: int, prev: str) -> None:
        """A record after crash remnants must continue the chain from before them."""
        first, _ = self.torn[0]
        if seq == self.seq + 1 and prev == self.hash:
            for pos, _ in self.torn:
                self.warnings.append(Finding(
                    "torn_line", f"line {pos.line} of {Path(pos.file).name} is an incomplete "
                    f"record left by a crash; the record after it (seq {seq}, line {n} of "
                    f"{file.name}) chains past it", pos.file, pos.line, seq))
            self.torn = []
            return
        self._fail("altered", f"line {first.line} of {Path(first.file).name} is not a complete "
                   f"record, and the record after it (seq {seq}, line {n} of {file.name}) "
                   f"does not continue the chain from seq {self.seq}", Path(first.file),
                   first.line, self.seq + 1)

    def _changed(self, file: Path, n: int, seq: int) -> None:
        if seq == 1:
            self._fail("altered", f"record seq 1 (line {n} of {file.name}) was altered: the "
                       "first record's prev must be 64 zeros", file, n, 1)
            return
        pos = self.last_pos or _Pos(str(file), n - 1)
        self._fail("altered", f"record seq {self.seq} (line {pos.line} of "
                   f"{Path(pos.file).name}) was altered: its hash no longer matches the prev "
                   f"of the record after it (seq {seq}, line {n})", Path(pos.file), pos.line,
                   self.seq)
        self._take_back_last()

    def _ahead(self, file: Path, n: int, line: bytes, seq: int, prev: str) -> None:
        expected = self.seq + 1
        assert self.current is not None
        following = _lines_after(self.current, n, _REORDER_WINDOW)
        nxt = parse_header(following[0]) if following else None
        if nxt is not None and nxt == (expected, self.hash):
            if seq == expected + 1 and prev == hashlib.sha256(following[0]).hexdigest():
                self._fail("reordered", f"records seq {expected} and {seq} were swapped: "
                           f"seq {seq} is at line {n} of {file.name}, seq {expected} at line "
                           f"{n + 1}", file, n, expected)
            else:
                self._fail("inserted", f"line {n} of {file.name} (seq {seq}) was inserted: "
                           f"the record after it (seq {expected}) chains to the one before it",
                           file, n, seq)
            return
        for k, later in enumerate(following[1:], start=2):
            if parse_header(later) == (expected, self.hash):
                self._fail("reordered", f"record seq {expected} was moved: it is at line "
                           f"{n + k - 1} of {file.name}, but line {n} holds seq {seq}",
                           file, n, expected)
                return
        if prev == self.hash:
            self._fail("altered", f"record at line {n} of {file.name} says seq {seq}, but it "
                       f"chains to seq {self.seq}: its seq was changed", file, n, seq)
            return
        missing = seq - expected
        span = f"seq {expected}" if missing == 1 else f"seq {expected} to {seq - 1}"
        self._fail("removed", f"{missing} record(s) removed before line {n} of {file.name}: "
                   f"{span} missing", file, n, expected)

    def _behind(self, file: Path, n: int, line: bytes, seq: int, prev: str) -> None:
        pos = self.last_pos or _Pos(str(file), n - 1)
        if line == self.last_line:
            self._fail("inserted", f"line {n} of {file.name} repeats the record before it "
                       f"(seq {seq})", file, n, seq)
        elif seq == self.seq and prev == self.before:
            self._fail("inserted", f"line {pos.line} of {Path(pos.file).name} (seq {self.seq}) "
                       f"was inserted or replaced: the record after it (line {n}) has the same "
                       "seq and chains to the record before it", Path(pos.file), pos.line,
                       self.seq)
            self._take_back_last()
        else:
            self._fail("reordered", f"record seq {seq} at line {n} of {file.name} is out of "
                       f"place: it comes after seq {self.seq}", file, n, seq)

    def _check_head(self, seq: int, file: str, n: int) -> None:
        for digest, label in self.heads[seq]:
            if digest != self.hash:
                self._fail("altered", f"record seq {seq} (line {n} of {Path(file).name}) is "
                           f"not the record {label} names: it was altered or the log was "
                           "rewritten from there on", Path(file), n, seq)
                self._take_back_last()
                return

    def _take_back_last(self) -> None:
        """The last record accepted turned out bad: do not count it as verified."""
        self.seq, self.hash = self.seq - 1, self.before
        self.records -= 1

    # ── the end of the log and segments verified before ───────────────────

    def _finish(self, files: list[_File]) -> None:
        for pos, whole in self.torn:
            self.warnings.append(Finding(
                "incomplete_last_record", f"incomplete last record at line {pos.line} of "
                f"{Path(pos.file).name}: a write was cut short, probably by a crash; it is not "
                "part of the chain" + ("" if not whole else " (it ends in a newline)"),
                pos.file, pos.line, self.seq + 1))
        has_current = any(f.path == self.path for f in files)
        for seq in sorted(self.heads):
            if seq <= self.pruned_seq:
                self.warnings.append(Finding(
                    "head_pruned", f"{self.heads[seq][0][1]} (seq {seq}) lies in segments "
                    "that were pruned, so it cannot be checked; keep a newer head "
                    "(`opsrun audit head` after each prune)", str(self.path), None, seq))
                continue
            if seq > self.seq:
                label = self.heads[seq][0][1]
                cut = seq - self.seq
                where = (f" (line {self.last_pos.line} of {Path(self.last_pos.file).name})"
                         if self.last_pos else "")
                gone = "" if has_current else f", and {self.path.name} is missing"
                self._fail("removed", f"the log ends at seq {self.seq}{where}, but {label} is "
                           f"seq {seq}: the last {cut} record(s) were removed{gone}",
                           Path(self.last_pos.file) if self.last_pos else self.path,
                           self.last_pos.line if self.last_pos else None, self.seq + 1)
                return
        if not files:
            self.warnings.append(Finding("no_log", f"there is no audit log at {self.path} yet",
                                         str(self.path)))
        elif not has_current:
            self.warnings.append(Finding(
                "no_current_segment", f"{self.path.name} does not exist after segment "
                f"{files[-1].path.name} (a rotation was interrupted; the next record starts it)",
                str(self.path)))

    def _skip(self, f: _File, saved: AuditCheckpoint, previous_name: str | None) -> bool:
        """Use a segment verified before if its bytes and its links are unchanged."""
        s = saved.summary
        if f.size != saved.size or s.get("first_seq") != self.seq + 1 or \
                s.get("first_prev") != self.hash or s.get("previous_segment") != previous_name:
            return False
        if any(s["first_seq"] <= q < s["last_seq"] for q in self.heads):
            return False  # a head to check lies inside: walk it
        if _file_sha256(f) != saved.sha256:
            return False
        self.seq, self.hash, self.before = s["last_seq"], s["last_hash"], s["before_hash"]
        self.records += s["records"]
        self.last_pos = _Pos(str(f.path), s["lines"])
        self.last_line = b""
        self.warnings.extend(Finding(**w) for w in s["warnings"])
        if self.seq in self.heads:
            self._check_head(self.seq, str(f.path), s["lines"])
        return True

    def _save(self, f: _File, digest: str, start: tuple[int, str, int, int],
              first: tuple[int, str, dict[str, Any] | None] | None, lines: int) -> None:
        if self.store is None or self.torn or self.records == start[2]:
            return
        record = first[2] if first else None
        summary = {"first_seq": start[0] + 1, "first_prev": start[1],
                   "previous_segment": record.get("previous_segment") if record else None,
                   "last_seq": self.seq, "last_hash": self.hash, "before_hash": self.before,
                   "records": self.records - start[2], "lines": lines,
                   "warnings": [asdict(w) for w in self.warnings[start[3]:]]}
        self.store.save_audit_checkpoint(str(self.path), AuditCheckpoint(
            f.number, f.size, digest, summary))

    def _fail(self, reason: str, message: str, file: Path, line: int | None,
              seq: int | None) -> None:
        if self.problem is None:
            self.problem = Finding(reason, message, str(file), line, seq)


def _prune_records(files: list[_File]) -> list[dict[str, Any]]:
    """The audit.pruned records of the log, oldest first (the chain walk checks them)."""
    needle = b'"kind":"audit.pruned"'
    found = []
    for f in files:
        carry = b""
        for chunk in _chunks(f):  # bytes.find over whole chunks: no loop over lines
            data = carry + chunk
            end = data.rfind(b"\n") + 1
            block, carry = data[:end], data[end:]
            at = block.find(needle)
            while at != -1:
                line = block[block.rfind(b"\n", 0, at) + 1:block.find(b"\n", at)]
                if is_record(line):
                    record = json.loads(line)
                    if record.get("kind") == "audit.pruned":
                        found.append(record)
                at = block.find(needle, at + len(needle))
    return found


def _chunks(f: _File) -> Iterator[bytes]:
    """The bytes the file had when it was opened (a record appended since is not seen)."""
    f.handle.seek(0)
    left = f.size
    while left > 0:
        chunk = f.handle.read(min(_CHUNK, left))
        if not chunk:
            return
        left -= len(chunk)
        yield chunk


def _lines(f: _File, digest: Any = None) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, bytes without newline, ended by a newline) for each line of a file."""
    n, carry = 0, b""
    for chunk in _chunks(f):
        if digest is not None:
            digest.update(chunk)
        parts = (carry + chunk).split(b"\n")
        carry = parts.pop()
        for line in parts:
            n += 1
            yield n, line, True
    if carry:
        yield n + 1, carry, False


def _lines_after(f: _File, n: int, count: int) -> list[bytes]:
    out: list[bytes] = []
    for k, line, _ in _lines(f):
        if k > n:
            out.append(line)
            if len(out) >= count:
                break
    return out


def _file_sha256(f: _File) -> str:
    h = hashlib.sha256()
    for chunk in _chunks(f):
        h.update(chunk)
    return h.hexdigest()
