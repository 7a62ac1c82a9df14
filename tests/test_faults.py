"""Disk and resource faults: a full disk, a read-only state folder, few file descriptors,
the kernel's inotify watch limit — through `opsrun run`, `opsrun watch` and `opsrun emit`.

What must hold: no step starts whose start could not be recorded; the error says what ran
out and what to do; nothing already recorded is damaged (`audit verify` passes on what was
written, the store still lists the runs); nothing hangs and no traceback is shown.

How the faults are made: small tmpfs mounts and read-only bind mounts (root may mount; where
it may not, these tests skip: tests/test_run_cli.py and tests/test_audit.py cover the file
size limit, RLIMIT_FSIZE, which works everywhere), RLIMIT_NOFILE in the child, and the inotify watch limit of a user
namespace (`unshare -U -r`; /proc/sys/user/max_inotify_watches there limits only the
processes inside, so the machine's own limit, shared with other tests, is left alone).
"""
from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.cli import command, no_traceback, opsrun
from tests.helpers.files import write
from tests.helpers.wait import wait_for

FULL = re.compile(r"No space left on device|disk[a-z ]* is full")


def marker_runbook(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A runbooks folder with one runbook, fired by `{"kind": "go"}`, that touches a marker:
    (folder, runbook, marker)."""
    marker = tmp_path / "ran"
    rbdir = tmp_path / "runbooks"
    rbdir.mkdir()
    rb = write(rbdir, "m.yaml", f"""\
        on:
          - event: {{where: {{kind: go}}}}
        steps:
          - run: touch {marker}
        """)
    return rbdir, rb, marker


def reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill a service a failed test left running, so it cannot outlive the test."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _mount(*args: str) -> bool:
    return os.geteuid() == 0 and subprocess.run(["mount", *args], capture_output=True,
                                                check=False).returncode == 0


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    made: list[Path] = []
    yield made
    for path in reversed(made):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def small_tmpfs(path: Path, size: str, mounts: list[Path]) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if _mount("-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)):
        mounts.append(path)
        return True
    return False


def fill(folder: Path) -> Path:
    """Take every free block of the file system under `folder`; return the filler file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def limited(**limits: int) -> Callable[[], None]:
    """A preexec_fn setting resource limits (RLIMIT_FSIZE: SIGXFSZ ignored, EFBIG instead)."""
    def apply() -> None:
        for name, value in limits.items():
            resource.setrlimit(getattr(resource, name), (value, value))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return apply


def run_limited(args: list[str], env: dict[str, str], preexec: Callable[[], None] | None,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(*args), env={**os.environ, **env}, preexec_fn=preexec,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, check=False)


def audit_kinds(log: Path) -> list[tuple[str, str | None, str | None]]:
    out = []
    for line in log.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            out.append((r["kind"], r.get("run_id"), r.get("step_id")))
    return out


MARKING = """\
    steps:
      - id: one
        run: touch {marks}/$OPSRUN_RUN_ID.one; head -c 1500 /dev/zero | tr '\\0' x
      - id: two
        run: touch {marks}/$OPSRUN_RUN_ID.two; head -c 1500 /dev/zero | tr '\\0' y
      - id: three
        run: touch {marks}/$OPSRUN_RUN_ID.three
    """


def test_audit_disk_fills_no_step_starts_unrecorded(tmp_path: Path, mounts: list[Path]) -> None:
    """Runs until the audit log's disk is full: each step that ran had its start recorded."""
    marks = tmp_path / "marks"
    marks.mkdir()
    rb = write(tmp_path, "fill.yaml", MARKING.format(marks=marks))
    logdir = tmp_path / "auditfs"
    env = {"OPSRUN_STATE_DIR": str(tmp_path / "state")}
    log = logdir / "audit.jsonl"
    args = ["run", str(rb), "--audit-log", str(log)]
    if not small_tmpfs(logdir, "32k", mounts):
        # RLIMIT_FSIZE cannot stand in here (it limits state.db as well): see
        # tests/test_run_cli.py::test_state_cannot_grow_nothing_starts for that limit.
        pytest.skip("needs root that may mount a small tmpfs")
    failed = None
    for _ in range(40):
        r = run_limited(args, env, None)
        assert no_traceback(r), r.stderr
        if r.returncode != 0:
            failed = r
            break
    assert failed is not None, "the audit log never filled up"
    assert failed.returncode == 1
    assert re.search(r"cannot write the audit record '[a-z.]+' to .*audit.jsonl: "
                     r"No space left on device", failed.stderr), failed.stderr
    assert "must not go ahead" in failed.stderr
    started = {(run, step) for kind, run, step in audit_kinds(log) if kind == "step.started"}
    ran = {tuple(p.name.split(".")) for p in marks.iterdir()}
    assert ran <= started, f"steps ran without a recorded start: {ran - started}"
    assert started - ran == set()  # and a recorded start is a step that did start
    verify = opsrun("audit", "verify", "--audit-log", str(log), env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    runs = json.loads(opsrun("runs", "--json", env=env).stdout)["runs"]
    assert runs and all(r["state"] == "succeeded" for r in runs[1:])
    assert runs[0]["state"] == "failed" and "audit" in runs[0]["error"]
    # Space again: the log goes on, chained to what was there.
    subprocess.run(["mount", "-o", "remount,size=1m", str(logdir)], check=True)
    assert run_limited(args, env, None).returncode == 0
    assert opsrun("audit", "verify", "--audit-log", str(log), env=env).returncode == 0


def test_state_disk_full_run_emit_watch(tmp_path: Path, mounts: list[Path]) -> None:
    fs = tmp_path / "fs"
    if not small_tmpfs(fs, "512k", mounts):
        pytest.skip("needs root that may mount a small tmpfs")
    state = fs / "state"
    env = {"OPSRUN_STATE_DIR": str(state)}
    rbdir, rb, marker = marker_runbook(tmp_path)
    assert opsrun("run", str(rb), env=env).returncode == 0
    assert opsrun("emit", '{"kind": "go", "n": 1}', env=env).returncode == 0
    marker.unlink()
    filler = fill(fs)

    r = opsrun("run", str(rb), env=env)
    assert r.returncode == 1 and no_traceback(r), r.stderr
    assert FULL.search(r.stdout + r.stderr), r.stderr
    assert not marker.exists()
    r = opsrun("emit", '{"kind": "go", "n": 2}', env=env)
    assert r.returncode != 0 and no_traceback(r)
    assert FULL.search(r.stderr), r.stderr

    # The service refuses to start, or starts and says what is wrong; either way, once there
    # is room again, the event queued before runs.
    log_path = tmp_path / "watch.log"

    def start() -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            return subprocess.Popen(command("watch", "--runbooks", str(rbdir)),
                                    env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log)

    svc = start()
    try:
        wait_for(lambda: svc.poll() is not None or "is ready" in log_path.read_text(),
                 timeout=30, message=log_path.read_text)
        wait_for(lambda: FULL.search(log_path.read_text()), timeout=30,
                 message=log_path.read_text)
        if svc.poll() is not None:
            assert svc.returncode == 1
        filler.unlink()
        if svc.poll() is not None:
            svc = start()
        wait_for(marker.exists, timeout=30, message=log_path.read_text)
        svc.send_signal(signal.SIGTERM)
        assert svc.wait(timeout=30) == 0
    finally:
        reap(svc)
    text = log_path.read_text()
    assert "Traceback" not in text, text
    verify = opsrun("audit", "verify", env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    states = [r["state"] for r in json.loads(opsrun("runs", "--json", env=env).stdout)["runs"]]
    assert "running" not in states and "succeeded" in states


def test_read_only_state_folder(tmp_path: Path, mounts: list[Path]) -> None:
    state = tmp_path / "state"
    env = {"OPSRUN_STATE_DIR": str(state)}
    rbdir, rb, marker = marker_runbook(tmp_path)
    assert opsrun("run", str(rb), env=env).returncode == 0
    marker.unlink()
    before = (state / "audit.jsonl").read_bytes()
    # As root, chmod does not stop writes: a read-only bind mount does.
    if not (_mount("--bind", str(state), str(state))):
        pytest.skip("needs root that may bind-mount")
    mounts.append(state)
    assert _mount("-o", "remount,ro,bind", str(state))
    for args in (["run", str(rb)], ["emit", '{"kind": "go"}'],
                 ["watch", "--runbooks", str(rbdir)]):
        r = opsrun(*args, env=env, timeout=30)
        assert r.returncode in (1, 2) and no_traceback(r), (args, r.stderr)
        assert "read-only file system" in r.stderr, (args, r.stderr)
    assert not marker.exists()
    assert (state / "audit.jsonl").read_bytes() == before
    verify = opsrun("audit", "verify", env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_few_file_descriptors_run_and_emit(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    rb = write(tmp_path, "m.yaml", f"steps:\n  - run: touch {marker}\n")
    env = {"OPSRUN_STATE_DIR": str(tmp_path / "state")}
    assert opsrun("run", str(rb), env=env).returncode == 0
    marker.unlink()
    failures = 0
    for limit in (8, 12, 16):
        for args in (["run", str(rb)], ["emit", '{"kind": "go"}']):
            r = run_limited(args, env, limited(RLIMIT_NOFILE=limit), timeout=30)
            if r.returncode == 0:
                marker.unlink(missing_ok=True)
                continue  # enough descriptors for this command after all
            failures += 1
            out = r.stdout + r.stderr
            assert r.returncode == 1 and no_traceback(r), (limit, args, out)
            assert "internal error" not in out, (limit, args, out)
            assert "open files" in out and "ulimit -n" in out, (limit, args, out)
            assert not marker.exists(), (limit, args, out)
    assert failures >= 2  # the limits are low enough to fail somewhere
    verify = opsrun("audit", "verify", env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def _watch_limited(rbdir: Path, env: dict[str, str], log_path: Path,
                   nofile: int) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(command("watch", "--runbooks", str(rbdir)),
                                env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log,
                                preexec_fn=limited(RLIMIT_NOFILE=nofile))


def test_few_file_descriptors_watch_many_logs(tmp_path: Path) -> None:
    """60 followed log files: with too few descriptors the service stops or runs fail,
    clearly, without a traceback and without a run left hanging."""
    rbdir, logs, marks = tmp_path / "runbooks", tmp_path / "logs", tmp_path / "marks"
    for d in (rbdir, logs, marks):
        d.mkdir()
    for i in range(60):
        (logs / f"l{i}.log").write_text("an old GO line\n")
        write(rbdir, f"r{i}.yaml", f"""\
            on:
              - log: {{path: {logs}/l{i}.log, match: GO}}
            steps:
              - run: touch {marks}/r{i}
            """)
    env = {"OPSRUN_STATE_DIR": str(tmp_path / "state")}

    # Too few to follow them all and keep the audit log: it says so and exits.
    log_path = tmp_path / "watch-48.log"
    svc = _watch_limited(rbdir, env, log_path, 48)
    assert svc.wait(timeout=60) == 1
    text = log_path.read_text()
    assert "Traceback" not in text and "open files" in text and "ulimit -n" in text, text

    # Enough to follow them, not to run steps besides: runs fail and say why.
    log_path = tmp_path / "watch-80.log"
    svc = _watch_limited(rbdir, env, log_path, 80)
    try:
        wait_for(lambda: "opsrun watch is ready" in log_path.read_text() or
                 svc.poll() is not None, timeout=30, message=log_path.read_text)
        assert svc.poll() is None, log_path.read_text()
        for i in range(60):
            with open(logs / f"l{i}.log", "a") as f:
                f.write("a new GO line\n")

        def ended() -> list[dict] | None:
            # A run whose lock file could not be opened is kept queued (the service logs
            # why, and starts it when it starts again): recorded, not lost, not hidden.
            runs = json.loads(opsrun("runs", "--json", "--limit", "1000",
                                     env=env).stdout)["runs"]
            text = log_path.read_text()
            done = [r for r in runs if r["state"] in ("succeeded", "failed") or (
                r["state"] == "queued" and re.search(
                    f"run could not go on run_id={r['id']} .*(open files|file descriptors)",
                    text))]
            return runs if len(done) == 60 else None

        runs = wait_for(ended, timeout=60, interval=0.2, message=log_path.read_text)
        svc.send_signal(signal.SIGTERM)
        assert svc.wait(timeout=30) == 0
    finally:
        reap(svc)
    text = log_path.read_text()
    assert "Traceback" not in text, text
    assert sorted(r["runbook"] for r in runs) == sorted(f"r{i}" for i in range(60))  # once each
    for r in runs:
        if r["state"] == "failed":
            assert "open files" in r["error"], r
        assert r["state"] in ("succeeded", "failed", "queued"), r
    assert {p.name for p in marks.iterdir()} == {r["runbook"] for r in runs
                                                  if r["state"] == "succeeded"}


def _userns_ok() -> bool:
    return subprocess.run(["unshare", "-U", "-r", "sh", "-c",
                           "echo 8 > /proc/sys/user/max_inotify_watches"],
                          capture_output=True, check=False).returncode == 0


def test_inotify_watch_limit_is_said_and_nothing_is_missed(tmp_path: Path) -> None:
    """More folders than the kernel lets this user watch: the service says so, and polls."""
    if not _userns_ok():
        pytest.skip("needs user namespaces (unshare -U) to lower the watch limit safely")
    tree, rbdir, out = tmp_path / "tree", tmp_path / "runbooks", tmp_path / "out"
    for d in (rbdir, out):
        d.mkdir()
    for i in range(20):
        (tree / f"d{i}").mkdir(parents=True)
    write(rbdir, "f.yaml", f"""\
        on:
          - file: {{paths: ["{tree}/**/*.txt"], events: [added]}}
        concurrency: {{policy: parallel}}
        steps:
          - run: touch {out}/$(basename "$(dirname ${{{{ event.path }}}})")
        """)
    env = {"OPSRUN_STATE_DIR": str(tmp_path / "state")}
    log_path = tmp_path / "watch.log"
    script = 'echo 8 > /proc/sys/user/max_inotify_watches && exec "$@"'
    with open(log_path, "wb") as log:
        svc = subprocess.Popen(["unshare", "-U", "-r", "sh", "-c", script, "sh",
                                *command("watch", "--runbooks", str(rbdir))],
                               env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                               stdout=log, stderr=log)
    try:
        wait_for(lambda: "opsrun watch is ready" in log_path.read_text() or
                 svc.poll() is not None, timeout=30, message=log_path.read_text)
        for i in (0, 7, 13, 19):
            (tree / f"d{i}" / "new.txt").write_text("x")
        wait_for(lambda: {p.name for p in out.iterdir()} == {"d0", "d7", "d13", "d19"},
                 timeout=30, message=log_path.read_text)
        svc.send_signal(signal.SIGTERM)
        assert svc.wait(timeout=30) == 0
    finally:
        reap(svc)
    text = log_path.read_text()
    assert "inotify limit is reached" in text and "max_user_watches" in text, text
    assert "Traceback" not in text
