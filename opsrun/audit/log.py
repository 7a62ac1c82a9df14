"""The audit log's writer: append-only, hash-chained, fsynced before the caller goes on.

Writers exclude each other with an flock on a separate lock file (`<log>.lock`), which
never moves, so a writer that still holds the file that another process just rotated can
notice it and reopen. Each batch of records is one os.write on an O_APPEND descriptor
followed by fdatasync. A line left torn by a crash is never rewritten: the next writer
starts on a fresh line and chains to the last complete record. The format is in
audit/format.py.
"""
from __future__ import annotations

import errno
import json
import os
import pwd
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from opsrun import file_lock, proc
from opsrun.audit.format import (
    FORMAT_VERSION,
    GENESIS,
    RESERVED_FIELDS,
    SEGMENT_STARTED,
    RunbookLike,
    is_record,
    line_hash,
    list_segments,
    lock_path_for,
    looks_torn,
    parse_header,
    rfc3339,
    segment_path,
)
from opsrun.digest import sha256_hex
from opsrun.errors import AuditWriteError, StateError, UsageError
from opsrun.store import AuditHead, Store

DEFAULT_MAX_SEGMENT_BYTES = 64 * 1024 * 1024
LOCK_TIMEOUT_S = 30.0

_KIND = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$")
_MAX_TORN_LINES = 16  # consecutive crash remnants skipped when looking for the last record

# Types written as they are; strings are not among them, as they go through the masker.
_SCALARS = frozenset({int, bool, type(None)})
_SCALARS_AND_STR = _SCALARS | {str}

_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False)


Masker = Callable[[str], str]


def segment_size_from_env(environ: Mapping[str, str] | None = None) -> int:
    """When the audit log starts a new segment: OPSRUN_AUDIT_SEGMENT_SIZE, default 64 MiB."""
    text = (os.environ if environ is None else environ).get("OPSRUN_AUDIT_SEGMENT_SIZE")
    if not text:
        return DEFAULT_MAX_SEGMENT_BYTES
    from opsrun.sizes import SizeError, parse_size
    try:
        size = parse_size(text)
    except SizeError as e:
        raise UsageError(f"OPSRUN_AUDIT_SEGMENT_SIZE: {e}") from None
    if size < 4096:
        raise UsageError(f"OPSRUN_AUDIT_SEGMENT_SIZE: {text!r} is too small; a segment must "
                         "hold a few records, so give at least 4KiB")
    return size


class Tip(NamedTuple):
    """The last complete record of a log file: where the next record chains on."""

    segment: int
    seq: int
    hash: str
    size: int  # bytes in the file when the tip was read
    torn: bool  # the file ends in an incomplete line


class AuditLog:
    """Appends hash-chained records to an audit log; safe across threads and processes."""

    def __init__(self, path: Path, *, store: Store | None = None, masker: Masker | None = None,
                 max_segment_bytes: int = DEFAULT_MAX_SEGMENT_BYTES,
                 lock_timeout_s: float = LOCK_TIMEOUT_S) -> None:
        self.path = Path(os.path.abspath(path))
        self.lock_path = lock_path_for(self.path)
        self.store = store
        self.masker = masker
        self.max_segment_bytes = max_segment_bytes
        self.lock_timeout_s = lock_timeout_s
        self._user, self._uid, self._host = _identity()
        self._thread_lock = threading.Lock()
        self._pid = os.getpid()
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._tip: Tip | None = None
        self._git_cache: dict[tuple[str, str | None], dict[str, Any] | None] = {}
        self._needs_segment_record = False  # the current file must begin with one
        self.warnings: list[str] = []
        problem = permission_problem(self.path)
        if problem:
            self.warnings.append(problem)
            _warn("%s", problem)

    def append(self, kind: str, *, run_id: str | None = None,
               runbook: RunbookLike | None = None, **fields: Any) -> dict[str, Any]:
        """Write one record durably and return it as written; raise AuditWriteError if not."""
        return self.append_many([(kind, dict(fields, run_id=run_id, runbook=runbook))])[0]

    def append_many(self, records: Sequence[tuple[str, Mapping[str, Any]]]
                    ) -> list[dict[str, Any]]:
        """Write several records under one lock with one fsync (group commit)."""
        bodies = [self._body(kind, dict(kw)) for kind, kw in records]
        if not bodies:
            return []
        with self._thread_lock:
            self._after_fork()
            try:
                with file_lock.flock(self._lock(), timeout_s=self.lock_timeout_s,
                                     what=str(self.lock_path)):
                    tip, preamble = self._prepare()
                    written = self._write(tip, preamble + bodies, bodies[0][0]["kind"])
            except AuditWriteError:
                raise
            except StateError as e:
                # A lock held too long, a state store that cannot be read: either way the
                # record is not written, and callers look for this one error.
                raise AuditWriteError(f"{e}; the audit record was not written") from e
        return written[len(preamble):]

    def head(self) -> AuditHead | None:
        """The last complete record of the log (any segment), or None if it has none."""
        with reading_lock(self.path):
            tip = last_tip(self.path)
        return None if tip is None else AuditHead(str(self.path), tip.segment, tip.seq,
                                                  tip.hash)

    def close(self) -> None:
        """Close the log's descriptors; a later append opens them again."""
        with self._thread_lock:
            for fd in (self._fd, self._lock_fd):
                if fd is not None:
                    os.close(fd)
            self._fd = self._lock_fd = None
            self._tip = None

    # ── building records (outside the lock) ─────────────────────────────────

    def _body(self, kind: str, kw: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        if not isinstance(kind, str) or not _KIND.match(kind):
            raise ValueError(f"audit record kind {kind!r} is not like 'run.started'")
        run_id, runbook = kw.pop("run_id", None), kw.pop("runbook", None)
        clash = RESERVED_FIELDS.intersection(kw)
        if clash:
            raise ValueError(f"audit fields {sorted(clash)} are reserved for the record header")
        body: dict[str, Any] = {
            "kind": kind, "run_id": run_id,
            "runbook": None if runbook is None else self._runbook(runbook),
            "user": self._user, "uid": self._uid, "host": self._host, "pid": os.getpid()}
        body.update(sorted(kw.items()))
        # Top-level order stays as built (header first); the kind is code, not data.
        mask = self.masker
        plain = _SCALARS if mask else _SCALARS_AND_STR
        clean = {k: v if (k == "kind" or type(v) in plain) else _clean(v, mask)
                 for k, v in body.items()}
        text = _ENCODER.encode(clean)
        return clean, text[1:].encode("ascii")  # without the opening brace

    def _runbook(self, ref: RunbookLike) -> dict[str, Any]:
        get = ref.get if isinstance(ref, Mapping) else (lambda k: getattr(ref, k, None))
        name, path, digest = get("name"), get("path"), get("sha256")
        abspath = None if path is None else os.path.abspath(os.fspath(path))
        if abspath is not None and digest is None:
            digest = _file_sha256(Path(abspath))
        out: dict[str, Any] = {"name": name, "path": abspath, "sha256": digest}
        if abspath is not None:
            key = (abspath, digest)
            if key not in self._git_cache:
                self._git_cache[key] = _git_info(Path(abspath))
            if self._git_cache[key] is not None:
                out["git"] = self._git_cache[key]
        return out

    # ── under the lock ──────────────────────────────────────────────────────

    def _prepare(self) -> tuple[Tip, list[tuple[dict[str, Any], bytes]]]:
        """Bring the descriptor and tip up to date; return records to write first."""
        tip = self._current_tip()
        if tip.seq == 0:
            return tip, []  # the very first record of the log
        if tip.size >= self.max_segment_bytes and not self._needs_segment_record:
            tip = self._rotate(tip)
        if self._needs_segment_record:
            previous = segment_path(self.path, tip.segment - 1)
            return tip, [self._body(SEGMENT_STARTED, {
                "segment": tip.segment, "previous_segment": previous.name,
                "previous_last_seq": tip.seq})]
        return tip, []

    def _current_tip(self) -> Tip:
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            on_disk = None
        if self._fd is not None:
            mine = os.fstat(self._fd)
            if mine.st_nlink == 0:
                # Rotation renames; only deletion leaves the open file without a name.
                raise AuditWriteError(
                    f"the audit log {self.path} was deleted while opsrun had it open; "
                    "restore it from a backup or find out who removed it, then run "
                    "`opsrun audit verify`")
            if on_disk is None or (on_disk.st_dev, on_disk.st_ino) != (mine.st_dev, mine.st_ino):
                os.close(self._fd)  # another process rotated it: follow the name
                self._fd, self._tip = None, None
            elif self._tip is not None and mine.st_size == self._tip.size:
                return self._tip  # nobody wrote since our last append
            elif self._tip is not None and mine.st_size < self._tip.size:
                raise AuditWriteError(
                    f"the audit log {self.path} shrank from {self._tip.size} to "
                    f"{mine.st_size} bytes while opsrun had it open: it was truncated; "
                    "run `opsrun audit verify` and investigate before going on")
        if self._fd is None:
            self._fd = self._open_log()
        tip = self._tip_from_disk()
        self._check_store_head(tip)
        self._tip = tip
        return tip

    def _open_log(self) -> int:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL
                             | os.O_CLOEXEC, 0o600)
                fsync_dir(self.path.parent)
            except FileExistsError:
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        except OSError as e:
            raise AuditWriteError(f"cannot open the audit log {self.path}: {e.strerror}; "
                                  f"{_hint(e)}") from e
        return fd

    def _tip_from_disk(self) -> Tip:
        """Find where to chain: this file's last record, else the previous segment's."""
        assert self._fd is not None
        segments = list_segments(self.path)
        number = (segments[-1][0] + 1) if segments else 1
        found = read_tip(self._fd, self.path)
        size = os.fstat(self._fd).st_size
        self._needs_segment_record = False
        if found is not None:
            return Tip(number, found[0], found[1], size, found[2])
        torn = size > 0  # only crash remnants in this file
        if segments:
            # A rotation was interrupted after the rename: chain to the previous segment.
            before = file_tip(segments[-1][1], segments[-1][0])
            if before is None:
                raise AuditWriteError(f"the audit segment {segments[-1][1]} has no complete "
                                      "record; run `opsrun audit verify`")
            self._needs_segment_record = True
            return Tip(number, before.seq, before.hash, size, torn)
        return Tip(1, 0, GENESIS, size, torn)

    def _check_store_head(self, tip: Tip) -> None:
        if self.store is None:
            return
        head = self.store.get_audit_head(str(self.path))
        if head is None or head.seq < tip.seq:
            return
        if head.seq > tip.seq:
            raise AuditWriteError(
                f"the audit log {self.path} ends at seq {tip.seq}, but the state store "
                f"recorded seq {head.seq}: records were removed from its end or the file was "
                "replaced; run `opsrun audit verify` and restore the log before going on")
        if head.hash != tip.hash:
            raise AuditWriteError(
                f"the last record of the audit log {self.path} (seq {tip.seq}) is not the one "
                "the state store recorded: it was changed; run `opsrun audit verify`")

    def _rotate(self, tip: Tip) -> Tip:
        assert self._fd is not None
        target = segment_path(self.path, tip.segment)
        if target.exists():
            raise AuditWriteError(f"cannot start a new audit segment: {target} already "
                                  "exists; run `opsrun audit verify`")
        try:
            os.rename(self.path, target)
            fsync_dir(self.path.parent)
        except OSError as e:
            raise AuditWriteError(f"cannot rename {self.path} to {target} to start a new "
                                  f"segment: {e.strerror}; {_hint(e)}") from e
        os.close(self._fd)
        self._fd, self._tip = None, None
        self._fd = self._open_log()
        self._needs_segment_record = True
        return Tip(tip.segment + 1, tip.seq, tip.hash, 0, False)

    def _write(self, tip: Tip, bodies: list[tuple[dict[str, Any], bytes]],
               kind: str) -> list[dict[str, Any]]:
        assert self._fd is not None
        stamp = rfc3339(time.time())
        seq, prev, chunks, written = tip.seq, tip.hash, [b"\n"] if tip.torn else [], []
        for clean, tail in bodies:
            seq += 1
            line = (b'{"v":%d,"seq":%d,"prev":"%s","time":"%s",' % (
                FORMAT_VERSION, seq, prev.encode(), stamp.encode())) + tail
            chunks += [line, b"\n"]
            written.append({"v": FORMAT_VERSION, "seq": seq, "prev": prev, "time": stamp,
                            **clean})
            prev = line_hash(line)
        data = b"".join(chunks)
        self._write_durably(data, tip.size, kind)
        self._needs_segment_record = False
        self._tip = Tip(tip.segment, seq, prev, tip.size + len(data), False)
        if self.store is not None:
            try:
                self.store.set_audit_head(AuditHead(str(self.path), tip.segment, seq, prev))
            except StateError as e:
                # The record itself is durable; only cut-tail detection is weakened.
                _warn("audit record %d written, but its head was not saved: %s", seq, e)
        return written

    def _write_durably(self, data: bytes, size_before: int, kind: str) -> None:
        assert self._fd is not None
        try:
            done = os.write(self._fd, data)
            while done < len(data):
                # A short write (disk full, size limit): the next one reports why.
                n = os.write(self._fd, memoryview(data)[done:])
                if n == 0:
                    raise OSError(errno.EIO, f"only {done} of {len(data)} bytes were written")
                done += n
            os.fdatasync(self._fd)
        except OSError as e:
            try:
                os.ftruncate(self._fd, size_before)  # take back our own unacknowledged bytes
            except OSError:
                pass  # the next writer treats what is left as a torn line
            self._tip = None
            raise AuditWriteError(
                f"cannot write the audit record {kind!r} to {self.path}: "
                f"{e.strerror or e}; nothing was recorded, so the action must not go ahead; "
                f"{_hint(e)}") from e

    def _lock(self) -> int:
        if self._lock_fd is None:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                self._lock_fd = file_lock.open_lock_file(self.lock_path)
            except StateError as e:
                raise AuditWriteError(f"{e}; the audit record was not written") from e
        return self._lock_fd

    def _after_fork(self) -> None:
        if os.getpid() != self._pid:
            # The child shares the parent's open file descriptions, and with them its
            # flock: take fresh ones so the lock excludes the parent again.
            for fd in (self._fd, self._lock_fd):
                if fd is not None:
                    os.close(fd)
            self._fd = self._lock_fd = None
            self._tip = None
            self._pid = os.getpid()


def read_tip(fd: int, path: Path) -> tuple[int, str, bool] | None:
    """(seq, hash, torn) of the last complete record in an open file, or None if none.

    Crash remnants after it are stepped over; anything else that is not a record raises
    AuditWriteError, since no one can tell where the chain should continue.
    """
    size = os.fstat(fd).st_size
    window = 64 * 1024
    while size:
        start = max(0, size - window)
        data = os.pread(fd, size - start, start)
        torn = not data.endswith(b"\n")
        lines = data.split(b"\n")[1 if start else 0:-1]  # whole lines only
        for skipped, line in enumerate(reversed(lines)):
            if is_record(line):
                seq, _ = parse_header(line) or (0, "")
                return seq, line_hash(line), torn
            if not looks_torn(line) or skipped >= _MAX_TORN_LINES:
                raise AuditWriteError(
                    f"{path}: a line near byte {start + data.rfind(line)} is not an audit "
                    "record, so opsrun cannot tell where to chain the next one; run "
                    "`opsrun audit verify` to find what happened")
        if start == 0:
            break
        window *= 8
    return None


def file_tip(file: Path, segment: int) -> Tip | None:
    """The last complete record of one file of a log, or None if it has none."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(f"cannot read the audit log {file}: {e.strerror}") from e
    try:
        found = read_tip(fd, file)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    return None if found is None else Tip(segment, found[0], found[1], size, found[2])


def last_tip(path: Path) -> Tip | None:
    """The last complete record of the log at `path`, in its current file or a segment."""
    segments = list_segments(path)
    tip = file_tip(path, segments[-1][0] + 1 if segments else 1)
    if tip is None and segments:
        tip = file_tip(segments[-1][1], segments[-1][0])
    return tip


def permission_problem(path: Path) -> str | None:
    """A warning if an existing log file can be read or written by more than it should."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    if mode & ~0o640:
        return (f"the audit log {path} has mode {mode:04o}, wider than 0600 (0640 to let a "
                f"group read it); run `chmod 600 {path}`")
    return None


@contextmanager
def reading_lock(path: Path) -> Iterator[None]:
    """Hold writers of the log at `path` off for a moment, to see its files consistently.

    Readers may lack write access to the folder: they lock when they can, and read anyway
    when the lock file cannot be opened.
    """
    lock_path = lock_path_for(path)
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        yield
        return
    try:
        with file_lock.flock(fd, shared=True, timeout_s=LOCK_TIMEOUT_S, what=str(lock_path)):
            yield
    finally:
        os.close(fd)


def _clean(value: Any, mask: Masker | None) -> Any:
    """A JSON-ready copy: masked strings, sorted object keys; other types refused."""
    if type(value) is str:
        return mask(value) if mask else value
    if isinstance(value, str):
        text = str.__str__(value)  # a str enum's value, not its repr
        return mask(text) if mask else text
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("audit fields cannot hold NaN or infinity")
        return value
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"audit field names must be strings, not {bad[0]!r}")
        return {k: _clean(value[k], mask) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_clean(v, mask) for v in value]
    if isinstance(value, os.PathLike):
        return _clean(os.fspath(value), mask)
    if isinstance(value, datetime):
        return _clean(rfc3339(value.timestamp()), mask)
    raise TypeError(f"an audit field of type {type(value).__name__} cannot be recorded; "
                    "use str, int, float, bool, None, list or dict")


def _warn(message: str, *args: object) -> None:
    import logging  # only when there is something to say: not on every command's start

    logging.getLogger("opsrun.audit").warning(message, *args)


def _identity() -> tuple[str, int, str]:
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return user, uid, os.uname().nodename  # what socket.gethostname() says, without socket


def _file_sha256(path: Path) -> str | None:
    try:
        return sha256_hex(path.read_bytes())
    except OSError:
        return None


def _git_info(path: Path) -> dict[str, Any] | None:
    """HEAD's commit and whether the file differs from it, if the file is in a work tree."""
    folder = str(path.parent)
    if not _may_be_in_git(path.parent):
        return None  # no git process for a runbook outside any repository
    # One git process for both questions: "true" or "false", then HEAD's commit (rc 1 and
    # no commit in a repository without one yet).
    rc, out, _ = proc.capture(["git", "-C", folder, "rev-parse", "--is-inside-work-tree",
                               "--verify", "--quiet", "HEAD^{commit}"])
    lines = out.split()
    if not lines or lines[0] != "true":
        return None
    commit = lines[1] if rc == 0 and len(lines) > 1 else None
    rc, out, _ = proc.capture(["git", "-C", folder, "status", "--porcelain",
                               "--untracked-files=all", "--", path.name])
    # Modified, staged, untracked or unknown all mean: HEAD alone does not show this file.
    return {"commit": commit, "dirty": rc != 0 or commit is None or bool(out.strip())}


def _may_be_in_git(folder: Path) -> bool:
    """Whether a folder may be in a git work tree: a `.git` in it or above it, or git is
    told where its repository is (GIT_DIR)."""
    if os.environ.get("GIT_DIR") or os.environ.get("GIT_WORK_TREE"):
        return True
    for parent in (folder, *folder.parents):
        if os.path.lexists(os.path.join(parent, ".git")):
            return True
    return False


def fsync_dir(folder: Path) -> None:
    """Make a rename, creation or removal in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hint(e: OSError) -> str:
    return {
        errno.ENOSPC: "the disk is full: free some space",
        errno.EDQUOT: "the disk quota is exhausted: free some space or raise the quota",
        errno.EFBIG: "the file reached its size limit (ulimit -f): raise the limit",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "this user may not write there: fix the permissions or use "
                      "--state-dir / --audit-log",
        errno.EPERM: "the file may not be changed (immutable or append-only attribute?)",
        errno.EIO: "the disk reported an I/O error: check it (dmesg)",
        errno.EMFILE: "this process's limit on open files is reached: raise it with ulimit -n "
                      "(LimitNOFILE= in a systemd unit)",
        errno.ENFILE: "the system's limit on open files is reached (fs.file-max)",
    }.get(e.errno or 0, "check the file, its folder and the disk")
