from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from opsrun.audit.format import GENESIS, RunbookRef, line_hash
from opsrun.audit.log import AuditLog
from opsrun.audit.verify import verify_log
from opsrun.errors import AuditWriteError
from opsrun.store import Store
from tests.test_store import as_other_user

HEADER = ["v", "seq", "prev", "time", "kind", "run_id", "runbook", "user", "uid", "host", "pid"]


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def run_child(script: str, **kw) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], text=True, **kw)


def wait_for(condition, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state: Path):
    s = Store.open(state)
    yield s
    s.close()


def test_record_format_and_chain(state: Path) -> None:
    log = AuditLog(state / "audit.jsonl")
    first = log.append("run.started", run_id="01RUN", trigger="manual", params={"b": 2, "a": 1})
    second = log.append("run.finished", run_id="01RUN", exit_code=0)
    raw = lines(state / "audit.jsonl")
    assert [json.loads(x) for x in raw] == [first, second]
    assert first["seq"] == 1 and first["prev"] == GENESIS and first["v"] == 1
    assert second["seq"] == 2 and second["prev"] == hashlib.sha256(raw[0]).hexdigest()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first["time"])
    assert first["user"] and first["uid"] == os.getuid() and first["pid"] == os.getpid()
    keys = [k for k, _ in json.loads(raw[0], object_pairs_hook=list)]
    assert keys == HEADER + ["params", "trigger"]  # fixed header, then the kind's fields sorted
    assert raw[0].startswith(b'{"v":1,"seq":1,"prev":"' + GENESIS.encode() + b'","time":"')
    assert list(json.loads(raw[0])["params"]) == ["a", "b"]


def test_text_is_ascii_and_deterministic(state: Path) -> None:
    log = AuditLog(state / "audit.jsonl")
    rec = log.append("step.output", text="héllo \x1b[31m\u202e", nested={"z": [1, {"y": "é"}]})
    raw = (state / "audit.jsonl").read_bytes()
    assert raw.isascii() and b"\x1b" not in raw
    assert json.loads(raw)["text"] == rec["text"] == "héllo \x1b[31m\u202e"


def test_masker_reaches_every_string(state: Path) -> None:
    log = AuditLog(state / "audit.jsonl", masker=lambda s: s.replace("hunter2", "***"))
    rec = log.append("step.finished", run_id="r-hunter2", stdout="pw=hunter2\n",
                     env={"PASS": "hunter2", "list": ["a", "xhunter2x", 3]},
                     runbook={"name": "rb-hunter2"})
    raw = (state / "audit.jsonl").read_bytes()
    assert b"hunter2" not in raw
    assert rec["stdout"] == "pw=***\n" and rec["env"]["list"] == ["a", "x***x", 3]
    assert rec["run_id"] == "r-***" and rec["runbook"]["name"] == "rb-***"


@pytest.mark.parametrize("kind, fields, error", [
    ("Run Started", {}, ValueError),
    ("run.started", {"seq": 7}, ValueError),
    ("run.started", {"prev": "x"}, ValueError),
    ("run.started", {"thing": object()}, TypeError),
    ("run.started", {"n": float("nan")}, ValueError),
    ("run.started", {"d": {1: "int key"}}, TypeError),
])
def test_bad_records_are_refused_before_writing(state: Path, kind: str, fields: dict,
                                                error: type) -> None:
    log = AuditLog(state / "audit.jsonl")
    with pytest.raises(error):
        log.append(kind, **fields)
    assert not (state / "audit.jsonl").exists()


def test_group_commit_is_one_write_and_one_sync(state: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog(state / "audit.jsonl")
    log.append("first.one")
    calls = {"write": 0, "sync": 0}
    real_write, real_sync = os.write, os.fdatasync

    def counting_write(fd: int, data: bytes) -> int:
        calls["write"] += 1
        return real_write(fd, data)

    def counting_sync(fd: int) -> None:
        calls["sync"] += 1
        real_sync(fd)

    monkeypatch.setattr(os, "write", counting_write)
    monkeypatch.setattr(os, "fdatasync", counting_sync)
    recs = log.append_many([("step.finished", {"run_id": "r", "n": i}) for i in range(100)])
    assert calls == {"write": 1, "sync": 1}
    assert [r["seq"] for r in recs] == list(range(2, 102)) and recs[0]["n"] == 0
    assert verify_log(state / "audit.jsonl").ok


def test_runbook_fields_and_git_commit(tmp_path: Path, state: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    book = repo / "web.yaml"
    book.write_text("name: web\n")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c",
                               "user.email=t@example.com", *args], check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    log = AuditLog(state / "audit.jsonl")
    untracked = log.append("run.started", runbook=RunbookRef("web", str(book)))["runbook"]
    assert untracked["git"] == {"commit": None, "dirty": True}
    git("add", "web.yaml")
    git("commit", "-q", "-m", "add web")
    clean = log.append("run.started", runbook=RunbookRef("web", str(book),
                                                         "0" * 64))["runbook"]
    assert clean["git"] == {"commit": git("rev-parse", "HEAD"), "dirty": False}
    book.write_text("name: web\n# edited\n")
    edited = log.append("run.started", runbook={"name": "web", "path": str(book)})["runbook"]
    assert edited["sha256"] == hashlib.sha256(book.read_bytes()).hexdigest()
    assert edited["git"]["dirty"] is True and edited["path"] == str(book)
    outside = tmp_path / "plain.yaml"
    outside.write_text("name: plain\n")
    rec = log.append("run.started", runbook=RunbookRef("plain", str(outside)))["runbook"]
    assert "git" not in rec and rec["name"] == "plain"


def test_new_log_and_folder_permissions(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "ops.jsonl"
    log = AuditLog(path)
    log.append("a.b")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(Path(str(path) + ".lock").stat().st_mode) == 0o600
    assert log.warnings == []


def test_existing_wider_log_is_reported(state: Path) -> None:
    AuditLog(state / "audit.jsonl").append("a.b")
    (state / "audit.jsonl").chmod(0o644)
    log = AuditLog(state / "audit.jsonl")
    assert any("mode 0644" in w and "chmod 600" in w for w in log.warnings)
    result = verify_log(state / "audit.jsonl")
    assert result.ok and [w.reason for w in result.warnings] == ["permissions"]
    (state / "audit.jsonl").chmod(0o640)  # group-readable is allowed (DESIGN section 5)
    assert AuditLog(state / "audit.jsonl").warnings == []


def test_segments_rotate_and_chain(state: Path, store: Store) -> None:
    log = AuditLog(state / "audit.jsonl", store=store, max_segment_bytes=2000)
    for i in range(40):
        log.append("step.finished", n=i)
    names = sorted(p.name for p in state.glob("audit*.jsonl"))
    assert "audit-1.jsonl" in names and "audit-2.jsonl" in names and "audit.jsonl" in names
    started = json.loads(lines(state / "audit-2.jsonl")[0])
    last_of_first = lines(state / "audit-1.jsonl")[-1]
    assert started["kind"] == "audit.segment_started" and started["segment"] == 2
    assert started["previous_segment"] == "audit-1.jsonl"
    assert started["prev"] == line_hash(last_of_first)
    assert started["seq"] == json.loads(last_of_first)["seq"] + 1
    result = verify_log(state / "audit.jsonl", store=store)
    assert result.ok and result.warnings == [] and result.segments == names
    head = store.get_audit_head(str(state / "audit.jsonl"))
    assert head is not None and head.seq == result.last_seq and head.hash == result.last_hash


def test_explicit_path_segments_are_named_after_it(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "ops.jsonl", max_segment_bytes=600)
    for i in range(10):
        log.append("a.b", n=i)
    assert (tmp_path / "ops-1.jsonl").exists() and (tmp_path / "ops.jsonl.lock").exists()
    assert verify_log(tmp_path / "ops.jsonl").ok


def test_writer_follows_a_rotation_done_by_another(state: Path) -> None:
    a = AuditLog(state / "audit.jsonl", max_segment_bytes=1500)
    b = AuditLog(state / "audit.jsonl", max_segment_bytes=1500)
    for i in range(30):
        (a if i % 3 else b).append("step.finished", n=i)
    result = verify_log(state / "audit.jsonl")
    assert result.ok and len(result.segments) > 3
    assert result.records == 30 + len(result.segments) - 1  # plus one segment_started each


def test_torn_tail_next_append_starts_fresh_and_chains(state: Path, store: Store) -> None:
    path = state / "audit.jsonl"
    log = AuditLog(path, store=store)
    for i in range(3):
        log.append("a.b", n=i)
    good = lines(path)
    with open(path, "ab") as f:  # what a crash in the middle of a write leaves
        f.write(good[-1][:57])
    result = verify_log(path, store=store)
    assert result.ok and [w.reason for w in result.warnings] == ["incomplete_last_record"]
    assert result.warnings[0].line == 4
    rec = AuditLog(path, store=store).append("after.crash")
    assert rec["seq"] == 4 and rec["prev"] == line_hash(good[-1])
    raw = lines(path)
    assert raw[3] == good[-1][:57] and json.loads(raw[4]) == rec
    again = verify_log(path, store=store)
    assert again.ok and [w.reason for w in again.warnings] == ["torn_line"]
    assert again.last_seq == 4


def test_interrupted_rotation_is_completed(state: Path) -> None:
    path = state / "audit.jsonl"
    log = AuditLog(path)
    for i in range(3):
        log.append("a.b", n=i)
    log.close()
    os.rename(path, state / "audit-1.jsonl")  # crash right after the rename
    rec = AuditLog(path).append("a.b", n=3)
    first = json.loads(lines(path)[0])
    assert first["kind"] == "audit.segment_started" and first["previous_segment"] == \
        "audit-1.jsonl" and first["seq"] == 4
    assert rec["seq"] == 5
    os.rename(path, state / "audit-2.jsonl")
    path.touch(mode=0o600)  # crash after creating the new file, before its first record
    AuditLog(path).append("a.b", n=4)
    result = verify_log(path)
    assert result.ok and result.records == 7 and result.warnings == []


def test_writer_refuses_a_log_cut_behind_the_store_head(state: Path, store: Store) -> None:
    path = state / "audit.jsonl"
    log = AuditLog(path, store=store)
    for i in range(5):
        log.append("a.b", n=i)
    log.close()
    path.write_bytes(b"".join(x + b"\n" for x in lines(path)[:3]))
    before = path.read_bytes()
    with pytest.raises(AuditWriteError, match="ends at seq 3.*recorded seq 5"):
        AuditLog(path, store=store).append("a.b")
    assert path.read_bytes() == before


def test_writer_notices_truncation_and_removal_while_open(state: Path, store: Store) -> None:
    path = state / "audit.jsonl"
    log = AuditLog(path, store=store)
    for i in range(3):
        log.append("a.b", n=i)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 10)
    with pytest.raises(AuditWriteError, match="shrank"):
        log.append("a.b")
    path.unlink()
    with pytest.raises(AuditWriteError, match="was deleted while opsrun had it open"):
        log.append("a.b")
    with pytest.raises(AuditWriteError, match="ends at seq 0.*recorded seq 3"):
        AuditLog(path, store=store).append("a.b")  # a new writer: the store head tells


def test_fail_closed_when_the_file_size_limit_is_hit(state: Path) -> None:
    path = state / "audit.jsonl"
    AuditLog(path).append("a.b", note="before the limit")
    child = run_child(f"""
        import os, resource
        from pathlib import Path
        from opsrun.audit.log import AuditLog
        from opsrun.errors import AuditWriteError
        log = AuditLog(Path({str(path)!r}))
        limit = os.path.getsize({str(path)!r}) + 700
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        n = 0
        try:
            while True:
                log.append("a.b", payload="x" * 150)
                n += 1
        except AuditWriteError as e:
            print(n)
            print(e)
    """, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    count, message = out.splitlines()
    assert "size limit" in message and "must not go ahead" in message
    raw = path.read_bytes()
    assert raw.endswith(b"\n") and len(lines(path)) == 1 + int(count)  # nothing partial
    result = verify_log(path)
    assert result.ok and result.warnings == []
    assert AuditLog(path).append("a.b")["seq"] == 2 + int(count)


def test_fail_closed_when_the_disk_is_full(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(small)],
            capture_output=True).returncode != 0:
        pytest.skip("needs root that may mount a small tmpfs")
    log = AuditLog(small / "audit.jsonl")
    try:
        written = 0
        with pytest.raises(AuditWriteError, match="disk is full.*|No space left"):
            for _ in range(1000):
                log.append("step.output", stdout="x" * 900)
                written += 1
        assert written > 10
        assert len(lines(small / "audit.jsonl")) == written  # nothing partial
        result = verify_log(small / "audit.jsonl")
        assert result.ok and result.warnings == [] and result.records == written
    finally:
        log.close()
        subprocess.run(["umount", str(small)], check=True)


def test_fail_closed_when_the_folder_is_read_only(tmp_path: Path) -> None:
    def attempt(folder: Path) -> str:
        try:
            AuditLog(folder / "audit.jsonl").append("run.started")
        except AuditWriteError as e:
            return str(e)
        return "written"

    message = as_other_user(tmp_path, attempt)
    assert "lock file" in message and "not written" in message


def test_threads_share_one_log(state: Path) -> None:
    log = AuditLog(state / "audit.jsonl")

    def work(t: int) -> None:
        for i in range(100):
            log.append("a.b", t=t, i=i)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = verify_log(state / "audit.jsonl")
    assert result.ok and result.records == 400


def test_a_forked_child_takes_its_own_lock(state: Path) -> None:
    log = AuditLog(state / "audit.jsonl")
    log.append("before.fork")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for i in range(150):
                log.append("child.n", i=i)
            code = 0
        finally:
            os._exit(code)
    for i in range(150):
        log.append("parent.n", i=i)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    result = verify_log(state / "audit.jsonl")
    assert result.ok and result.records == 301 and result.warnings == []


@pytest.mark.slow
def test_two_processes_append_5000_each(state: Path) -> None:
    Store.open(state).close()
    script = f"""
        import sys
        from pathlib import Path
        from opsrun.audit.log import AuditLog
        from opsrun.store import Store
        log = AuditLog(Path({str(state / "audit.jsonl")!r}), store=Store.open(Path({str(state)!r})))
        worker = sys.argv[1]
        sys.stdin.readline()
        for i in range(5000):
            log.append("load.test", worker=worker, i=i)
    """
    children = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), w],
                                 stdin=subprocess.PIPE, text=True) for w in "ab"]
    for c in children:  # start both at once
        assert c.stdin is not None
        c.stdin.write("go\n")
        c.stdin.close()
    assert [c.wait(timeout=120) for c in children] == [0, 0]
    records = [json.loads(x) for x in lines(state / "audit.jsonl")]  # no torn line
    assert [r["seq"] for r in records] == list(range(1, 10_001))  # gapless, in order
    for w in "ab":
        assert [r["i"] for r in records if r["worker"] == w] == list(range(5000))
    with Store.open(state) as s:
        result = verify_log(state / "audit.jsonl", store=s)
        head = s.get_audit_head(str(state / "audit.jsonl"))
    assert result.ok and result.records == 10_000 and result.warnings == []
    assert head is not None and head.seq == 10_000
    mixed = sum(1 for x, y in zip(records, records[1:]) if x["worker"] != y["worker"])
    assert mixed > 1  # the two really did run at the same time


def test_sigkill_in_the_middle_of_appending(state: Path) -> None:
    Store.open(state).close()
    path = state / "audit.jsonl"
    child = run_child(f"""
        from pathlib import Path
        from opsrun.audit.log import AuditLog
        from opsrun.store import Store
        log = AuditLog(Path({str(path)!r}), store=Store.open(Path({str(state)!r})))
        big = "x" * (4 << 20)  # long writes, so that the kill may land inside one
        i = 0
        while True:
            log.append("step.output", i=i, stdout=big if i % 2 else "short")
            i += 1
            if i == 3:
                print("running", flush=True)
    """, stdout=subprocess.PIPE)
    assert child.stdout is not None and child.stdout.readline().strip() == "running"
    size = path.stat().st_size
    wait_for(lambda: path.stat().st_size > size + (4 << 20), what="more appends")
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    with Store.open(state) as s:
        result = verify_log(path, store=s)
        assert result.ok, result.problem
        assert {w.reason for w in result.warnings} <= {"incomplete_last_record"}
        assert result.records >= 4
        rec = AuditLog(path, store=s).append("after.crash")
        assert (rec["seq"], rec["prev"]) == (result.last_seq + 1, result.last_hash)
        assert lines(path)[-1].startswith(b'{"v":1,"seq":%d,' % rec["seq"])
        after = verify_log(path, store=s)
    assert after.ok and {w.reason for w in after.warnings} <= {"torn_line"}
    assert after.last_seq == rec["seq"]


def test_a_lock_held_too_long_fails_closed(state: Path) -> None:
    log = AuditLog(state / "audit.jsonl", lock_timeout_s=0.2)
    log.append("a.b")
    import fcntl

    fd = os.open(state / "audit.jsonl.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process (a hung opsrun?) holds it
        with pytest.raises(AuditWriteError, match="held by another process.*not written"):
            log.append("a.b")
    finally:
        os.close(fd)
    assert log.append("a.b")["seq"] == 2
