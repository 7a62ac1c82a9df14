"""Who may do what: file modes, another user, secrets, and what a reviewer would try.

The other user is a real one (tests/helpers/users.py creates it; CI runs as root). Its
commands run in a forked child with its uid and gid, calling opsrun's entry point: the
kernel checks the same credentials as for `sudo -u bob opsrun …`. The child cannot read
the interpreter's files under /root, so every opsrun module is imported beforehand.

By design (DESIGN section 4 and opsrun/control_socket.py): the state folder's permissions decide
who reaches the service at all (0700: only its owner; 0750 with a group: the group may
emit, list what is pending and answer where `approvers:` allows); cancelling needs the
service's own user or root; the audit log and the state store stay 0600 either way.
"""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.cli import command, no_traceback, opsrun
from tests.helpers.files import write
from tests.helpers.service import Service
from tests.helpers.users import OtherUser, other_user, run_as, share_with_group
from tests.helpers.wait import wait_for

SECRET = "hunter2-s3cr3t-value-Zq9"


@pytest.fixture
def reachable() -> Iterator[Path]:
    """A folder other users can reach (pytest's own temp folders are 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="opsrun-perm-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)


def _warm() -> None:
    import opsrun

    for m in pkgutil.walk_packages(opsrun.__path__, "opsrun."):
        if m.name != "opsrun.__main__":
            importlib.import_module(m.name)


def as_other(user: OtherUser, *args: str, state: Path) -> tuple[int, str]:
    """`opsrun ARGS` as the other user, with OPSRUN_STATE_DIR=state."""
    _warm()

    def child() -> int:
        from opsrun.cli import main

        os.environ["OPSRUN_STATE_DIR"] = str(state)
        return main(list(args))

    code, out = run_as(user, child)
    assert "Traceback" not in out and "internal error" not in out, out
    return code, out


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def pending(state: Path) -> list[dict]:
    r = opsrun("pending", "--json", env={"OPSRUN_STATE_DIR": str(state)})
    return json.loads(r.stdout)["pending"] if r.returncode == 0 else []


def wait_pending(state: Path, count: int = 1) -> list[dict]:
    return wait_for(lambda: (lambda p: p if len(p) >= count else None)(pending(state)),
                    timeout=30)


def start_waiting(rb: Path, state: Path, started: list[subprocess.Popen[str]],
                  env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    p = subprocess.Popen(command("run", str(rb)),
                         env={**os.environ, "OPSRUN_STATE_DIR": str(state), **(env or {})},
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    started.append(p)
    return p


ASK = """\
    on:
      - event: {where: {kind: ask}}
    steps:
      - id: ask
        confirm: Go ahead?
        approvers: [root]
      - run: touch {marker}
    """


# ── modes ───────────────────────────────────────────────────────────────────

def test_files_and_sockets_are_private(tmp_path: Path,
                                       started: list[subprocess.Popen[str]]) -> None:
    rbdir = tmp_path / "runbooks"
    rbdir.mkdir()
    write(rbdir, "ask.yaml", ASK.replace("{marker}", str(tmp_path / "ran")))
    svc = Service(tmp_path, rbdir)
    try:
        svc.start()
        assert svc.cli("emit", '{"kind": "ask"}').returncode == 0
        start_waiting(rbdir / "ask.yaml", svc.state, started)
        wait_pending(svc.state, 2)
        state = svc.state
        assert mode(state) == 0o700
        for name in ("audit.jsonl", "audit.jsonl.lock", "state.db", "state.db-wal",
                     "state.db-shm"):
            assert mode(state / name) == 0o600, name
        sock = state / "control.sock"
        assert stat.S_ISSOCK(sock.lstat().st_mode) and mode(sock) == 0o660
        runs = state / "runs"
        assert mode(runs) == 0o700
        socks = list(runs.glob("*.sock"))
        assert socks and all(mode(s) == 0o660 for s in socks)
        assert all(mode(lock) == 0o600 for lock in runs.glob("*.lock"))
    finally:
        svc.close()


# ── another user, outside the folder's group ───────────────────────────────

def test_another_user_can_neither_read_nor_act(tmp_path: Path, reachable: Path,
                                               started: list[subprocess.Popen[str]]) -> None:
    user = other_user()
    state = reachable / "state"
    env = {"OPSRUN_STATE_DIR": str(state)}
    marker = tmp_path / "ran"
    rb = write(tmp_path, "ask.yaml", ASK.replace("{marker}", str(marker)))
    p = start_waiting(rb, state, started)
    run_id = wait_pending(state)[0]["run_id"]
    queued = sqlite3.connect(state / "state.db").execute(
        "SELECT count(*) FROM event_queue").fetchone()[0]

    for args in (["audit", "show"], ["audit", "verify"], ["audit", "tail"], ["runs"],
                 ["logs", run_id], ["pending"], ["emit", '{"kind": "ask"}'],
                 ["approve", run_id], ["deny", run_id], ["cancel", run_id]):
        code, out = as_other(user, *args, state=state)
        assert code != 0, (args, out)
        assert "Permission denied" in out or "permissions do not let you in" in out or \
            "not writable by this user" in out, (args, out)
        assert run_id not in out.replace(f"{run_id}.sock", "") or args[0] in (
            "logs", "approve", "deny", "cancel"), (args, out)  # nothing read from the store
    assert pending(state)[0]["run_id"] == run_id  # still waiting, unanswered
    assert sqlite3.connect(state / "state.db").execute(
        "SELECT count(*) FROM event_queue").fetchone()[0] == queued
    kinds = [json.loads(line)["kind"] for line in (state / "audit.jsonl").read_text()
             .splitlines()]
    assert "confirm.answered" not in kinds and "confirm.refused" not in kinds
    assert opsrun("deny", run_id, env=env).returncode == 0
    p.communicate(timeout=30)
    assert not marker.exists()


def test_event_files_are_read_as_the_caller(tmp_path: Path, reachable: Path) -> None:
    """`--event @FILE` reads with the caller's own rights, and never shows the contents."""
    user = other_user()
    private = tmp_path / "shadow"
    private.write_text(f"root:$6${SECRET}:19000:0:99999:7:::\n")
    private.chmod(0o600)
    rb = write(reachable, "e.yaml", "steps:\n  - run: echo ${{ event.v }}\n")
    rb.chmod(0o644)
    code, out = as_other(user, "run", str(rb), "--event", f"@{private}",
                         state=reachable / "bob-state")
    assert code == 2 and "cannot read the file: Permission denied" in out, out
    assert SECRET not in out
    r = opsrun("run", str(rb), "--event", f"@{private}",
               env={"OPSRUN_STATE_DIR": str(tmp_path / "state")})
    assert r.returncode == 2 and "was rejected: not JSON" in r.stderr
    assert SECRET not in r.stdout + r.stderr


# ── a member of the folder's group ─────────────────────────────────────────

def test_group_member_may_not_cancel_forge_or_read(tmp_path: Path, reachable: Path) -> None:
    user = other_user()
    rbdir, drop = reachable / "runbooks", reachable / "drop"
    for d in (rbdir, drop):
        d.mkdir()
    marker = tmp_path / "ran"
    write(rbdir, "ask.yaml", ASK.replace("{marker}", str(marker)))
    write(rbdir, "files.yaml", f"""\
        on:
          - file: {{paths: ["{drop}/*.txt"], events: [added]}}
        steps:
          - run: touch {tmp_path}/file-ran
        """)
    write(rbdir, "yearly.yaml", f"""\
        on:
          - schedule: {{cron: "0 0 1 1 *"}}
        steps:
          - run: touch {tmp_path}/schedule-ran
        """)
    from opsrun.matcher import trigger_keys
    from opsrun.runbook import load_runbook

    file_key = trigger_keys(load_runbook(rbdir / "files.yaml"))[0]
    cron_key = trigger_keys(load_runbook(rbdir / "yearly.yaml"))[0]
    svc = Service(reachable, rbdir)
    state = svc.state
    share_with_group(state)
    try:
        svc.start()
        # The group may emit (the folder lets it in) ...
        code, out = as_other(user, "emit", '{"kind": "ask"}', state=state)
        assert code == 0, out
        run_id = wait_pending(state)[0]["run_id"]
        # ... but an emitted event is a JSON event, whatever it claims to be.
        forged = [{"source": "file", "trigger": file_key, "path": f"{drop}/x.txt",
                   "change": "added"}, {"source": "schedule", "trigger": cron_key,
                                        "scheduled_for": "2020-01-01T00:00:00Z"}]
        for event in forged:
            code, out = as_other(user, "emit", json.dumps(event), state=state)
            assert code == 0, out
        # No request names a runbook file or a command: there is nothing to smuggle one in.
        reply = _raw_request_as(user, state / "control.sock",
                                {"op": "run", "runbook": str(tmp_path / "evil.yaml")})
        assert reply["ok"] is False and "unknown request 'run'" in reply["message"]

        code, out = as_other(user, "approve", run_id, state=state)
        assert code == 1 and "only root may answer" in out, out
        code, out = as_other(user, "cancel", run_id, state=state)
        assert code == 1 and "may cancel runs; you are" in out, out
        for args in (["audit", "show"], ["runs"], ["logs", run_id]):
            code, out = as_other(user, *args, state=state)
            assert code != 0 and ("Permission denied" in out or "not writable" in out), out
        wait_for(lambda: len([r for r in svc.runs() if r["trigger"] != file_key]) >= 1,
                 timeout=10)
        assert pending(state)[0]["run_id"] == run_id
        assert svc.cli("cancel", run_id).returncode == 0
        wait_for(lambda: any(r["id"] == run_id and r["state"] == "cancelled"
                             for r in svc.runs()), timeout=20)
        assert svc.stop() == 0
    finally:
        svc.close()
    assert not marker.exists()
    assert not (tmp_path / "file-ran").exists() and not (tmp_path / "schedule-ran").exists()
    assert {r["runbook"] for r in svc.runs()} == {"ask"}
    refused = [r for r in svc.audit() if r["kind"] == "confirm.refused"]
    assert refused and refused[0]["answerer"]["uid"] == user.uid


def _raw_request_as(user: OtherUser, sock: Path, request: dict) -> dict:
    r, w = os.pipe()

    def child() -> int:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(sock))
        s.sendall(json.dumps(request).encode() + b"\n")
        os.write(w, s.makefile("rb").readline())
        return 0

    code, out = run_as(user, child)
    os.close(w)
    data = os.read(r, 65536)
    os.close(r)
    assert code == 0, out
    reply: dict = json.loads(data)
    return reply


# ── a state folder someone else prepared ───────────────────────────────────

def test_state_folder_planted_by_another_user_is_refused(tmp_path: Path,
                                                         reachable: Path) -> None:
    """Symlinks planted in (or as) the state folder must not make opsrun write through them."""
    user = other_user()
    drop = reachable / "drop"
    drop.mkdir()
    drop.chmod(0o1777)  # like /tmp
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    fresh = tmp_path / "would-be-created"

    def plant() -> int:
        (drop / "state").mkdir(mode=0o755)
        (drop / "state" / "audit.jsonl").symlink_to(victim)
        (drop / "state" / "state.db").symlink_to(fresh)
        (drop / "link").symlink_to(tmp_path)
        return 0

    assert run_as(user, plant)[0] == 0
    rb = write(tmp_path, "r.yaml", f"steps:\n  - run: touch {tmp_path}/ran\n")
    for folder, why, commands in (
            (drop / "state", f"is owned by {user.name}",
             (["run", str(rb)], ["emit", "{}"], ["audit", "verify"], ["runs"])),
            (drop / "link", f"is a symbolic link made by {user.name}", (["run", str(rb)],))):
        for args in commands:
            r = opsrun(*args, env={"OPSRUN_STATE_DIR": str(folder)})
            assert r.returncode != 0 and no_traceback(r), (args, r.stderr)
            assert why in r.stderr and "will not use it" in r.stderr, (args, r.stderr)
    assert victim.read_text() == "precious\n" and not fresh.exists()
    assert not (tmp_path / "ran").exists() and not (tmp_path / "audit.jsonl").exists()
    shared = reachable / "group-writable"
    shared.mkdir()
    shared.chmod(0o770)
    r = opsrun("run", str(rb), env={"OPSRUN_STATE_DIR": str(shared)})
    assert r.returncode == 1 and "can be written by its group or others" in r.stderr
    assert not (tmp_path / "ran").exists()


# ── secrets ────────────────────────────────────────────────────────────────

def test_secrets_never_leave_the_process(tmp_path: Path,
                                         started: list[subprocess.Popen[str]]) -> None:
    """Not in any process's arguments, not in steps that did not ask, not in the audit log,
    the state store (db and WAL), the terminal, --json, pending, or an error message."""
    state = tmp_path / "state"
    env = {"OPSRUN_STATE_DIR": str(state), "OPSRUN_SECRET_TOKEN": SECRET,
           "OPSRUN_KILL_GRACE": "200ms"}
    pids = tmp_path / "pids"
    pids.mkdir()
    uses = write(tmp_path, "uses.yaml", f"""\
        steps:
          - run: |
              T=${{{{ secrets.TOKEN }}}}
              echo $$ > {pids}/uses
              sleep 30
        """)
    plain = write(tmp_path, "plain.yaml", f"""\
        steps:
          - run: echo $$ > {pids}/plain; sleep 30
        """)
    for rb in (uses, plain):
        start_waiting(rb, state, started, env)
    wait_for(lambda: len(list(pids.iterdir())) == 2, timeout=30)
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                args = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            assert SECRET.encode() not in args, (proc.name, args)
    plain_env = (Path("/proc") / (pids / "plain").read_text().strip() / "environ").read_bytes()
    assert SECRET.encode() not in plain_env and b"OPSRUN_SECRET_" not in plain_env
    for p in started:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=30)

    failing = write(tmp_path, "failing.yaml", """\
        steps:
          - id: stderr
            run: echo "token ${{ secrets.TOKEN }} rejected" >&2; exit 3
            continue_on_error: true
          - id: expression
            run: echo ${{ secrets.TOKEN | int }}
            continue_on_error: true
          - id: condition
            if: secrets.TOKEN | int > 1
            run: echo never
            continue_on_error: true
          - id: workdir
            workdir: /nonexistent/${{ secrets.TOKEN }}
            run: "true"
        """)
    shown = ""
    for args in ([], ["--json"], ["--dry-run"]):
        r = opsrun("run", str(failing), *args, env=env)
        assert r.returncode in (0, 1, 2), r.stderr
        shown += r.stdout + r.stderr
    asks = write(tmp_path, "asks.yaml", """\
        steps:
          - confirm: Rotate the key ${{ secrets.TOKEN }}?
        """)
    p = start_waiting(asks, state, started, env)
    waiting = wait_pending(state)[0]
    shown += json.dumps(waiting) + opsrun("pending", env=env).stdout
    assert opsrun("deny", waiting["run_id"], env=env).returncode == 0
    shown += "".join(p.communicate(timeout=30))
    runs = json.loads(opsrun("runs", "--json", env=env).stdout)["runs"]
    failed = next(r["id"] for r in runs if r["runbook"] == "failing")
    shown += opsrun("logs", failed, env=env).stdout + opsrun("logs", failed, "--json",
                                                             env=env).stdout
    shown += opsrun("logs", waiting["run_id"], env=env).stdout
    shown += opsrun("audit", "show", env=env).stdout + opsrun("runs", env=env).stdout
    assert SECRET not in shown
    assert "token *** rejected" in shown and "*** is not a whole number" not in shown
    assert "'***' is not a whole number" in shown and "/nonexistent/***" in shown
    stored = b"".join(f.read_bytes() for f in state.iterdir() if f.is_file())
    assert SECRET.encode() not in stored
    assert b"***" in (state / "audit.jsonl").read_bytes()


def test_the_audit_log_verified_is_the_one_written(tmp_path: Path) -> None:
    """OPSRUN_AUDIT_LOG names the log for every command, not only for `opsrun audit`."""
    log = tmp_path / "elsewhere" / "audit.jsonl"
    log.parent.mkdir(mode=0o700)
    env = {"OPSRUN_STATE_DIR": str(tmp_path / "state"), "OPSRUN_AUDIT_LOG": str(log)}
    rb = write(tmp_path, "r.yaml", "steps:\n  - run: 'true'\n")
    assert opsrun("run", str(rb), env=env).returncode == 0
    assert not (tmp_path / "state" / "audit.jsonl").exists()
    verify = opsrun("audit", "verify", env=env)
    assert verify.returncode == 0 and f"verified: {log}: 4 records" in verify.stdout, \
        verify.stdout


def test_a_log_the_service_may_not_read_is_said(reachable: Path) -> None:
    """The service's user cannot read a followed log: a warning, once, not a silent gap."""
    user = other_user()
    log = reachable / "app.log"
    log.write_text("ERROR before\n")
    log.chmod(0o600)  # root's
    _warm()

    def child() -> int:
        import logging
        import sys

        from opsrun.runbook import LogTrigger
        from opsrun.sources.logtail import LogSource

        class Positions:
            def get_log_position(self, key: str) -> None:
                return None

            def set_log_positions(self, items: object) -> None:
                pass

            def set_log_position(self, *args: object, **kw: object) -> None:
                pass

        handler = logging.StreamHandler(sys.stdout)
        logging.getLogger("opsrun.sources").addHandler(handler)
        source = LogSource([("k", LogTrigger(str(log), "ERROR", "start"))], Positions())
        for _ in range(3):
            source.poll(lambda events: None, glob_now=True)
        return 0

    code, out = run_as(user, child)
    assert code == 0, out
    assert out.count(f"log {log}: cannot be opened: Permission denied") == 1, out
