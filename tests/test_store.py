from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from opsrun import store as store_mod
from opsrun.errors import StateError
from opsrun.store import MAX_OUTPUT_BYTES, SCHEMA_VERSION, AuditHead, Store, new_run_id


@pytest.fixture
def store(tmp_path: Path):
    s = Store.open(tmp_path / "state")
    yield s
    s.close()


def test_open_creates_folder_and_database_from_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b" / "state"
    with Store.open(folder) as s:
        assert s.schema_version() == SCHEMA_VERSION
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "state.db").stat().st_mode) == 0o600
    conn = sqlite3.connect(folder / "state.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"runs", "steps", "approvals", "log_positions", "schedule_marks", "event_queue",
            "audit_head", "audit_checkpoints"} <= tables


def test_reopening_keeps_data_and_does_not_migrate_again(tmp_path: Path) -> None:
    with Store.open(tmp_path) as s:
        run = s.create_run("backup")
    with Store.open(tmp_path) as s:
        assert s.get_run(run.id) == run
        assert s.schema_version() == SCHEMA_VERSION


def test_forward_migrations_run_in_order_once(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with Store.open(tmp_path) as s:
        s.create_run("backup")
    extra = [["CREATE TABLE later (x INTEGER)"], ["INSERT INTO later VALUES (42)"]]
    monkeypatch.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS + extra)
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 2)
    for _ in range(2):
        with Store.open(tmp_path) as s:
            assert s.schema_version() == SCHEMA_VERSION + 2
            assert len(s.list_runs()) == 1
    conn = sqlite3.connect(tmp_path / "state.db")
    assert conn.execute("SELECT x FROM later").fetchall() == [(42,)]


def test_newer_schema_is_refused_with_advice(tmp_path: Path) -> None:
    Store.open(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "state.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    conn.close()
    with pytest.raises(StateError, match="newer than this opsrun knows.*upgrade opsrun"):
        Store.open(tmp_path)


def test_folder_that_is_a_file_gives_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(StateError, match="--state-dir"):
        Store.open(tmp_path / "f")


def test_run_ids_sort_by_creation_time(monkeypatch: pytest.MonkeyPatch) -> None:
    ids = []
    for ms in (1_700_000_000_000, 1_700_000_000_001, 1_800_000_000_000):
        monkeypatch.setattr(time, "time", lambda ms=ms: ms / 1000)
        monkeypatch.setattr(time, "time_ns", lambda ms=ms: ms * 1_000_000)
        ids.append(new_run_id())
    assert ids == sorted(ids) and all(len(i) == 26 for i in ids)
    assert len(set(new_run_id() for _ in range(1000))) == 1000


def test_runs_create_update_list(store: Store) -> None:
    a = store.create_run("web", runbook_path="/rb/web.yaml", runbook_sha256="ab" * 32,
                         event={"source": "manual"}, params={"dry": True}, started_by="ann",
                         started_uid=1000, trigger="manual")
    assert a.state == "queued" and a.params == {"dry": True} and a.event == {"source": "manual"}
    assert a.created_at.tzinfo is not None
    now = datetime.now(timezone.utc)
    assert store.update_run(a.id, state="running", started_at=now, current_step=0)
    got = store.get_run(a.id)
    assert got is not None and got.state == "running" and got.current_step == 0
    assert abs((got.started_at or now) - now) < timedelta(milliseconds=1)
    # compare-and-set: only one of two racing transitions applies
    assert store.update_run(a.id, expect_state="running", state="succeeded", exit_code=0)
    assert not store.update_run(a.id, expect_state=("running", "waiting"), state="cancelled")
    assert store.update_run(a.id, error=None)  # None sets NULL; omitted leaves alone
    b = store.create_run("db")
    assert [r.id for r in store.list_runs()] == [b.id, a.id]
    assert [r.id for r in store.list_runs(runbook="web")] == [a.id]
    assert [r.id for r in store.list_runs(state=["queued"])] == [b.id]
    assert store.get_run("nope") is None
    with pytest.raises(ValueError, match="unknown run state"):
        store.update_run(a.id, state="exploded")


def test_steps_keep_the_tail_of_long_output(store: Store) -> None:
    run = store.create_run("web")
    big = "x" * MAX_OUTPUT_BYTES + "é" + "END"
    store.record_step(run.id, 0, "status", outcome="running")
    store.record_step(run.id, 0, "status", outcome="failure", exit_code=3, stdout_tail=big,
                      outputs={"a": "1"}, hosts={"web-1": {"exit_code": 3}})
    store.record_step(run.id, 0, "status", attempt=2, outcome="success", exit_code=0)
    store.record_step(run.id, 1, "restart", outcome="skipped")
    steps = store.steps_of(run.id)
    assert [(s.position, s.attempt, s.outcome) for s in steps] == [
        (0, 1, "failure"), (0, 2, "success"), (1, 1, "skipped")]
    assert steps[0].stdout_tail.endswith("éEND")
    assert len(steps[0].stdout_tail.encode()) <= MAX_OUTPUT_BYTES
    assert steps[0].outputs == {"a": "1"} and steps[0].hosts == {"web-1": {"exit_code": 3}}


def test_approval_exactly_one_answer_wins(store: Store) -> None:
    run = store.create_run("web")
    q = store.create_approval(run.id, "approve", "Restart?", approvers=["root", "group:ops"],
                              starter="ann", deadline=datetime.now(timezone.utc))
    assert store.create_approval(run.id, "approve", "Restart?").id == q.id  # idempotent
    assert [p.id for p in store.pending_approvals()] == [q.id]
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def answer(i: int) -> None:
        barrier.wait()
        results.append(store.answer_approval(run.id, "approved" if i % 2 else "denied",
                                             answered_by=f"u{i}", answered_uid=i, how="cli"))

    threads = [threading.Thread(target=answer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert store.pending_approvals() == []
    (done,) = store.approvals_of(run.id)
    assert done.answer in ("approved", "denied") and done.answered_at is not None
    # The step may ask again later (a resumed run): a new question, the old answer stays.
    again = store.create_approval(run.id, "approve", "Restart?")
    assert again.id != q.id and len(store.approvals_of(run.id)) == 2


def test_two_processes_answering_only_one_wins(tmp_path: Path) -> None:
    with Store.open(tmp_path) as s:
        run = s.create_run("web")
        s.create_approval(run.id, "ok", "Go?")
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from opsrun.store import Store
        s = Store.open(Path({str(tmp_path)!r}))
        sys.stdin.readline()
        print(s.answer_approval({run.id!r}, "approved", answered_by="p", answered_uid=1,
                                how="cli"))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=30)[0].strip() for p in procs]
    assert sorted(outs) == ["False"] * 3 + ["True"]


def test_log_positions_and_schedule_marks(store: Store) -> None:
    assert store.get_log_position("kern") is None
    store.set_log_position("kern", 2049, 123, 456)
    store.set_log_position("kern", 2049, 124, 0)
    pos = store.get_log_position("kern")
    assert pos is not None and (pos.device, pos.inode, pos.offset) == (2049, 124, 0)
    when = datetime(2025, 3, 30, 1, 0, tzinfo=timezone.utc)
    assert store.get_schedule_mark("rb:0") is None
    store.set_schedule_mark("rb:0", when)
    assert store.get_schedule_mark("rb:0") == when


def test_event_queue_hands_off_at_least_once(store: Store) -> None:
    ids = store.enqueue_events([{"n": 1}, {"n": 2}, {"n": 3}], source={"uid": 7})
    assert len(ids) == 3 and store.queue_length() == 3
    assert [e.event["n"] for e in store.peek_events(2)] == [1, 2]
    taken = store.take_events(2, lease_s=60)
    assert [e.event["n"] for e in taken] == [1, 2] and taken[0].source == {"uid": 7}
    assert [e.event["n"] for e in store.take_events(5, lease_s=60)] == [3]  # 1, 2 are leased
    assert store.accept_queued(taken[0].id, [])  # handled: it leaves the queue
    # A taker that died: with its lease over, the event is handed out again.
    assert [e.event["n"] for e in store.take_events(5, lease_s=0)] == []
    assert store.queue_length() == 2
    assert [store.accept_queued(i, []) for i in ids] == [False, True, True]
    assert store.queue_length() == 0


def test_expired_lease_is_handed_out_again(store: Store) -> None:
    store.enqueue_events([{"n": 1}])
    assert len(store.take_events(lease_s=-1)) == 1  # lease already over
    assert [e.event for e in store.take_events(lease_s=60)] == [{"n": 1}]


def test_audit_head_only_moves_forward(store: Store) -> None:
    assert store.get_audit_head("/l") is None
    store.set_audit_head(AuditHead("/l", 1, 10, "a" * 64))
    store.set_audit_head(AuditHead("/l", 1, 9, "b" * 64))
    head = store.get_audit_head("/l")
    assert head is not None and (head.seq, head.hash) == (10, "a" * 64)


def test_reader_process_while_writer_writes(tmp_path: Path) -> None:
    Store.open(tmp_path).close()
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from pathlib import Path
        from opsrun.store import Store
        s = Store.open(Path({str(tmp_path)!r}))
        for i in range(400):
            r = s.create_run("rb", params={{"i": i}})
            s.update_run(r.id, state="running")
            s.enqueue_events([{{"i": i}}])
        print("done", flush=True)
    """)], stdout=subprocess.PIPE, text=True)
    seen: list[int] = []
    with Store.open(tmp_path) as reader:
        deadline = time.monotonic() + 60
        while writer.poll() is None and time.monotonic() < deadline:
            seen.append(len(reader.list_runs(limit=10_000)))
            reader.queue_length()
        out, _ = writer.communicate(timeout=60)
        assert out.strip() == "done" and writer.returncode == 0
        assert seen == sorted(seen)  # reads never go back in time nor fail while busy
        assert len(reader.list_runs(limit=10_000)) == 400 and reader.queue_length() == 400


def test_read_only_folder_gives_a_clear_error(tmp_path: Path) -> None:
    def attempt(folder: Path) -> str:
        try:
            Store.open(folder)
        except StateError as e:
            return str(e)
        return "opened"

    message = as_other_user(tmp_path, attempt)
    assert "is not writable by this user" in message


def as_other_user(tmp_path: Path, fn, setup=None) -> str:
    """Call fn(folder) where this user cannot write `folder`; return what fn returned.

    `setup(folder)` runs first, as this user, while the folder is still writable. Root may
    write anywhere, so as root fn runs in a forked child that became `nobody` (forked,
    because the interpreter itself may live where nobody cannot read).
    """
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir(mode=0o700)
        if setup:
            setup(folder)
        folder.chmod(0o500)
        try:
            return fn(folder)
        finally:
            folder.chmod(0o700)
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="opsrun-ro-", dir="/tmp"))
    try:
        base.chmod(0o755)
        folder = base / "state"
        folder.mkdir(mode=0o755)
        if setup:
            setup(folder)
        before = sorted(folder.iterdir())
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 1
            try:
                os.close(read)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                os.write(write, fn(folder).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        with os.fdopen(read, "rb") as r:
            out = r.read().decode()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, out
        assert sorted(folder.iterdir()) == before  # nothing was created
        return out
    finally:
        shutil.rmtree(base)


def test_run_id_prefixes_latest_approval_and_runbook_versions(store: Store) -> None:
    a = store.create_run("web", run_id="01AAAAAAAAAAAAAAAAAAAAAAAA")
    store.create_run("web", run_id="01AAAAAAAAAAAAAAAAAAAAAAAB")
    assert store.find_run_ids("01aaa") == [a.id, "01AAAAAAAAAAAAAAAAAAAAAAAB"]
    assert store.find_run_ids("01AAAAAAAAAAAAAAAAAAAAAAAA") == [a.id]
    assert store.find_run_ids("02") == []
    assert store.latest_approval(a.id, "ok") is None
    q = store.create_approval(a.id, "ok", "Go?")
    assert store.answer_approval(a.id, "approved", answered_by="ann", answered_uid=1, how="cli")
    latest = store.latest_approval(a.id, "ok")
    assert latest is not None and latest.answer == "approved"
    store.unanswer_approval(q.id)  # the audit record of the answer failed: it does not count
    assert [p.id for p in store.pending_approvals(a.id)] == [q.id]
    assert store.runbook_version("ab" * 32) is None
    store.save_runbook_version("ab" * 32, "/rb/web.yaml", b"name: web\n")
    store.save_runbook_version("ab" * 32, "/elsewhere.yaml", b"other")  # kept once
    assert store.runbook_version("ab" * 32) == ("/rb/web.yaml", b"name: web\n")
