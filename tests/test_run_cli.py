"""`opsrun run` through the real entry point, on real processes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.cli import command, no_traceback, on_terminal, opsrun
from tests.helpers.files import audit, write
from tests.helpers.procs import alive
from tests.helpers.wait import wait_for


def audit_records(env: dict[str, str]) -> list[dict]:
    return audit(Path(env["OPSRUN_STATE_DIR"]))


def test_quickstart_runs(repo_root: Path, env: dict[str, str]) -> None:
    r = opsrun("run", "runbooks/hello.yaml", "-p", "name=Ada", cwd=repo_root, env=env)
    assert r.returncode == 0, r.stderr
    assert "greet | Hello, Ada!" in r.stdout
    assert "report | the greeting had 5 letters" in r.stdout
    assert "[loud] skipped (if: params.shout)" in r.stdout
    assert "\x1b[" not in r.stdout


def test_run_by_name_and_json(repo_root: Path, env: dict[str, str]) -> None:
    r = opsrun("run", "hello", "-p", "shout=yes", "--json", cwd=repo_root, env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["run"]["state"] == "succeeded" and doc["run"]["exit_code"] == 0
    steps = {s["id"]: s for s in doc["steps"]}
    assert steps["greet"]["outputs"] == {"length": "5"}
    assert steps["loud"]["stdout"] == "HELLO, WORLD!\n"
    assert steps["report"]["outcome"] == "success"


def test_failure_retry_and_on_failure(tmp_path: Path, env: dict[str, str]) -> None:
    rb = write(tmp_path, "f.yaml", """\
        steps:
          - id: a
            run: echo "x=1" >> "$OPSRUN_OUTPUT"
          - id: flaky
            run: echo try >> ${{ params.log }}; exit 3
            retry: {attempts: 3, delay: 10ms, backoff: 2}
          - id: never
            run: touch ${{ params.log }}.never
        on_failure:
          - run: echo "failed at ${{ run.failed_step }} x=${{ steps.a.outputs.x }}"
        params:
          log: {type: string}
        """)
    log = tmp_path / "tries"
    r = opsrun("run", str(rb), "-p", f"log={log}", env=env)
    assert r.returncode == 1
    assert log.read_text() == "try\n" * 3
    assert not Path(f"{log}.never").exists()
    assert "on_failure-1 | failed at flaky x=1" in r.stdout
    assert "failed in" in r.stdout and "step 'flaky' exited with 3" in r.stdout
    kinds = [(rec["kind"], rec.get("step_id"), rec.get("attempt")) for rec in audit_records(env)]
    assert [k for k in kinds if k[1] == "flaky"] == [
        ("step.started", "flaky", 1), ("step.finished", "flaky", 1),
        ("step.retrying", "flaky", 2),
        ("step.started", "flaky", 2), ("step.finished", "flaky", 2),
        ("step.retrying", "flaky", 3),
        ("step.started", "flaky", 3), ("step.finished", "flaky", 3)]


def test_continue_on_error_and_if(tmp_path: Path, env: dict[str, str]) -> None:
    rb = write(tmp_path, "c.yaml", """\
        steps:
          - id: check
            run: exit 4
            continue_on_error: true
          - id: fix
            if: steps.check.exit_code != 0
            run: echo "fixing after ${{ steps.check.exit_code }}"
          - id: skipped
            if: steps.check.outcome == 'success'
            run: echo nope
        """)
    r = opsrun("run", str(rb), "--json", env=env)
    assert r.returncode == 0, r.stderr
    steps = {s["id"]: s for s in json.loads(r.stdout)["steps"]}
    assert steps["check"]["outcome"] == "failure" and steps["check"]["exit_code"] == 4
    assert steps["fix"]["stdout"] == "fixing after 4\n"
    assert steps["skipped"]["outcome"] == "skipped"


def test_environment_workdir_stdin(tmp_path: Path, env: dict[str, str]) -> None:
    (tmp_path / "wd").mkdir()
    rb = write(tmp_path, "e.yaml", """\
        env:
          TOP: top-${{ params.p }}
        params:
          p: {default: v}
        steps:
          - id: show
            env: {STEP: step}
            workdir: ${{ params.dir }}
            run: |
              echo "$TOP $STEP $OPSRUN_RUN_ID $OPSRUN_EVENT_SOURCE $(pwd)"
              echo "$OPSRUN_EVENT" > event.json
              read -r line; echo "read rc=$?"
        """.replace("${{ params.dir }}", str(tmp_path / "wd")))
    r = opsrun("run", str(rb), "--json", "--event", '{"kind": "test", "n": 3}', env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    out = doc["steps"][0]["stdout"].splitlines()
    assert out[0] == f"top-v step {doc['run']['id']} manual {tmp_path / 'wd'}"
    assert out[1] == "read rc=1"  # stdin is closed
    event = json.loads((tmp_path / "wd" / "event.json").read_text())
    assert event["kind"] == "test" and event["n"] == 3 and event["source"] == "manual"


def test_event_from_file_and_stdin(tmp_path: Path, env: dict[str, str]) -> None:
    rb = write(tmp_path, "ev.yaml", "steps:\n  - run: echo ${{ event.name }}\n")
    (tmp_path / "e.json").write_text('{"name": "from-file"}')
    r = opsrun("run", str(rb), "--event", f"@{tmp_path / 'e.json'}", env=env)
    assert "| from-file" in r.stdout
    r = opsrun("run", str(rb), "--event", "-", input='{"name": "from-stdin"}', env=env)
    assert "| from-stdin" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["-p", "nope=1"], "unknown param 'nope'"),
    (["-p", "n=abc"], "param 'n': 'abc' is not a whole number"),
    (["-p", "n"], "write params as -p name=value"),
    (["--event", "[1]"], "the event from --event was rejected: a JSON event must be an object"),
    (["--event", "{bad"], "the event from --event was rejected: not JSON"),
    (["--event", "@/nonexistent"], "cannot read the file"),
])
def test_usage_errors_exit_2(tmp_path: Path, env: dict[str, str], args: list[str],
                             message: str) -> None:
    rb = write(tmp_path, "u.yaml", "params:\n  n: {type: int, default: 1}\nsteps:\n  - run: 'true'\n")
    r = opsrun("run", str(rb), *args, env=env)
    assert r.returncode == 2
    assert message in r.stderr
    assert no_traceback(r)


def test_invalid_runbook_exit_2_nothing_runs(tmp_path: Path, env: dict[str, str]) -> None:
    marker = tmp_path / "ran"
    rb = write(tmp_path, "bad.yaml", f"steps:\n  - run: touch {marker}\n    timout: 1s\n")
    r = opsrun("run", str(rb), env=env)
    assert r.returncode == 2
    assert "unknown key 'timout'" in r.stderr
    assert not marker.exists()


def test_required_param(repo_root: Path, env: dict[str, str]) -> None:
    r = opsrun("run", "deploy", cwd=repo_root, env=env)
    assert r.returncode == 2
    assert "param 'version' is required; give it with -p version=VALUE" in r.stderr


def test_dry_run_runs_nothing(tmp_path: Path, env: dict[str, str]) -> None:
    marker = tmp_path / "ran"
    rb = write(tmp_path, "d.yaml", f"""\
        params:
          f: {{default: "a b"}}
        steps:
          - id: one
            run: touch {marker} ${{{{ params.f }}}}
          - id: two
            if: params.f == 'zzz'
            run: echo skipped
          - id: ask
            confirm: go on with ${{{{ params.f }}}}?
          - id: three
            if: steps.one.exit_code == 0
            run: echo ${{{{ steps.one.outputs.x }}}}
        """)
    r = opsrun("run", str(rb), "--dry-run", env=env)
    assert r.returncode == 0, r.stderr
    assert not marker.exists()
    assert f"$ touch {marker} 'a b'" in r.stdout
    assert "two: would be skipped (if: params.f == 'zzz')" in r.stdout
    assert "ask: would ask for approval" in r.stdout and "go on with a b?" in r.stdout
    assert "three: runs or is skipped depending on earlier steps" in r.stdout
    assert "$ echo ${{ steps.one.outputs.x }}" in r.stdout
    assert not (Path(env["OPSRUN_STATE_DIR"]) / "audit.jsonl").exists()


def test_timeout_kills_grandchild_ignoring_sigterm(tmp_path: Path, env: dict[str, str]) -> None:
    pidfile = tmp_path / "pids"
    rb = write(tmp_path, "t.yaml", f"""\
        steps:
          - id: stubborn
            timeout: 300ms
            run: |
              trap '' TERM
              (trap '' TERM; exec sleep 600) &
              echo $! > {pidfile}
              echo $$ >> {pidfile}
              wait
        """)
    r = opsrun("run", str(rb), env=env)
    assert r.returncode == 1
    assert "TIMED OUT" in r.stdout and "step 'stubborn' timed out" in r.stdout
    for pid in map(int, pidfile.read_text().split()):
        assert not alive(pid), f"process {pid} survived the timeout"


def test_run_timeout(tmp_path: Path, env: dict[str, str]) -> None:
    rb = write(tmp_path, "rt.yaml", """\
        timeout: 400ms
        steps:
          - run: sleep 0.1
          - run: sleep 30
          - id: after
            run: echo never
        """)
    r = opsrun("run", str(rb), "--json", env=env)
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["steps"][1]["outcome"] == "timed_out"
    assert "after" not in [s["id"] for s in doc["steps"]]


def test_leftover_background_process_is_stopped(tmp_path: Path, env: dict[str, str]) -> None:
    pidfile = tmp_path / "bg"
    rb = write(tmp_path, "bg.yaml", f"steps:\n  - run: sleep 600 & echo $! > {pidfile}\n")
    r = opsrun("run", str(rb), env=env)
    assert r.returncode == 0
    assert not alive(int(pidfile.read_text()))


def test_sigint_cancels_and_exits_130(tmp_path: Path, env: dict[str, str]) -> None:
    started = tmp_path / "started"
    pidfile = tmp_path / "pid"
    rb = write(tmp_path, "long.yaml", f"""\
        steps:
          - id: long
            run: echo $$ > {pidfile}; touch {started}; sleep 600
          - id: after
            run: echo never
        """)
    p = subprocess.Popen(command("run", str(rb)), env={**os.environ, **env},
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    wait_for(started.exists, timeout=20)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    assert "cancelled" in out
    assert not alive(int(pidfile.read_text()))
    r = opsrun("runs", "--json", env=env)
    assert json.loads(r.stdout)["runs"][0]["state"] == "cancelled"
    kinds = [rec["kind"] for rec in audit_records(env)]
    assert kinds[-1] == "run.finished" and audit_records(env)[-1]["state"] == "cancelled"


def test_sigterm_cancels(tmp_path: Path, env: dict[str, str]) -> None:
    started = tmp_path / "started"
    rb = write(tmp_path, "long.yaml", f"steps:\n  - run: touch {started}; sleep 600\n")
    p = subprocess.Popen(command("run", str(rb)), env={**os.environ, **env},
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    wait_for(started.exists, timeout=20)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=30)
    assert p.returncode == 130


def test_big_output_memory_bounded(tmp_path: Path, env: dict[str, str]) -> None:
    rb = write(tmp_path, "big.yaml", """\
        steps:
          - id: big
            run: |
              head -c 80000000 /dev/zero | tr '\\0' 'x'
              echo
              seq 1 3000000
        """)
    probe = ("import resource, subprocess, sys\n"
             f"r = subprocess.run({command('run', str(rb), '--json')!r}, stdout=subprocess.PIPE,"
             " stderr=subprocess.DEVNULL)\n"
             "sys.stdout.write(str(r.returncode) + ' ' + "
             "str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) + ' ' + "
             "str(len(r.stdout)))\n")
    done = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)
    code, rss_kb, out_len = map(int, done.stdout.split())
    assert code == 0, done.stderr
    assert rss_kb < 150_000, f"peak RSS {rss_kb} kB for ~100 MB of output"
    assert out_len < 1_000_000  # the kept output is the tail, not everything


def test_records_in_store_and_audit(tmp_path: Path, env: dict[str, str]) -> None:
    rb = write(tmp_path, "r.yaml", "steps:\n  - id: hi\n    run: echo hello\n")
    r = opsrun("run", str(rb), "--json", env=env)
    run_id = json.loads(r.stdout)["run"]["id"]
    runs = json.loads(opsrun("runs", "--json", env=env).stdout)["runs"]
    assert runs[0]["id"] == run_id and runs[0]["state"] == "succeeded"
    logs = opsrun("logs", run_id[:10], env=env)
    assert logs.returncode == 0
    assert "[hi] success, exit code 0" in logs.stdout and "  hello" in logs.stdout
    kinds = [rec["kind"] for rec in audit_records(env)]
    assert kinds == ["run.started", "step.started", "step.finished", "run.finished"]
    finished = audit_records(env)[2]
    assert finished["stdout"] == "hello\n" and finished["outcome"] == "success"
    assert opsrun("audit", "verify", env=env).returncode == 0


def test_runs_filters(tmp_path: Path, env: dict[str, str]) -> None:
    ok = write(tmp_path, "ok.yaml", "steps:\n  - run: 'true'\n")
    bad = write(tmp_path, "bad.yaml", "steps:\n  - run: 'false'\n")
    opsrun("run", str(ok), env=env)
    opsrun("run", str(bad), env=env)
    failed = json.loads(opsrun("runs", "--state", "failed", "--json", env=env).stdout)["runs"]
    assert [r["runbook"] for r in failed] == ["bad"]
    by_name = json.loads(opsrun("runs", "--runbook", "ok", "--json", env=env).stdout)["runs"]
    assert [r["runbook"] for r in by_name] == ["ok"]
    r = opsrun("runs", "--state", "bogus", env=env)
    assert r.returncode == 2 and "unknown state 'bogus'" in r.stderr
    assert opsrun("logs", "nope", env=env).returncode == 2


def test_audit_disk_full_nothing_starts(tmp_path: Path, env: dict[str, str]) -> None:
    """The audit log's disk is full (it is /dev/full): the run does not start, and says why."""
    marker = tmp_path / "ran"
    rb = write(tmp_path, "full.yaml", f"steps:\n  - run: touch {marker}\n")
    state = Path(env["OPSRUN_STATE_DIR"])
    state.mkdir(mode=0o700)
    (state / "audit.jsonl").symlink_to("/dev/full")
    r = opsrun("run", str(rb), env=env)
    assert r.returncode == 1
    assert "cannot write the audit record 'run.started'" in r.stderr
    assert "No space left on device" in r.stderr
    assert no_traceback(r)
    assert not marker.exists()


def test_state_cannot_grow_nothing_starts(tmp_path: Path, env: dict[str, str]) -> None:
    """A run whose start cannot be recorded does not start (files may not grow: RLIMIT_FSIZE)."""
    marker = tmp_path / "ran"
    rb = write(tmp_path, "fc.yaml", f"steps:\n  - run: touch {marker}\n")
    opsrun("run", str(rb), env=env)  # creates state and log
    marker.unlink()
    size = (Path(env["OPSRUN_STATE_DIR"]) / "audit.jsonl").stat().st_size
    probe = ("import resource, subprocess, sys\n"
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size + 100}, {size + 100}))\n"
             "import signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
             f"sys.exit(subprocess.run({command('run', str(rb))!r}).returncode)\n")
    done = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert not marker.exists()
    assert "Traceback" not in done.stderr
    assert opsrun("audit", "verify", env=env).returncode == 0


def test_live_view_on_a_terminal(repo_root: Path, env: dict[str, str]) -> None:
    """On a terminal (and without NO_COLOR) the rich view: marks, output, a summary."""
    code, out = on_terminal("run", "hello", "-p", "name=Tty", cwd=repo_root, env=env)
    assert code == 0
    assert "\x1b[" in out  # colour on a terminal
    assert "Hello, Tty!" in out
    assert "✓" in out and "Say hello" in out
    assert "succeeded" in out and "outcome" in out  # the summary table


def test_an_ended_run_leaves_no_lock_file(tmp_path: Path, env: dict[str, str]) -> None:
    ok = write(tmp_path, "ok.yaml", "steps:\n  - run: 'true'\n")
    bad = write(tmp_path, "bad.yaml", "steps:\n  - run: 'false'\n")
    assert opsrun("run", str(ok), env=env).returncode == 0
    assert opsrun("run", str(bad), env=env).returncode == 1
    events = '{"kind": "x"}\n'
    (tmp_path / "rb").mkdir()
    write(tmp_path / "rb", "e.yaml", "on: [{event: {where: {kind: x}}}]\nsteps:\n  - run: 'true'\n")
    assert opsrun("dispatch", "-r", str(tmp_path / "rb"), input=events, env=env).returncode == 0
    runs = Path(env["OPSRUN_STATE_DIR"]) / "runs"
    assert list(runs.glob("*.lock")) == []


def test_resume_after_kill_9_ends_the_orphan_first(tmp_path: Path, env: dict[str, str]) -> None:
    """`opsrun run` killed with SIGKILL leaves its step running; `opsrun resume` ends that
    process (recorded) before it runs the step again, so the two never run together."""
    marks = tmp_path / "marks"
    rb = write(tmp_path, "r.yaml", f"""\
        steps:
          - id: work
            run: |
              echo "begin $$" >> {marks}
              if [ -e {tmp_path}/again ]; then exit 0; fi
              touch {tmp_path}/again
              sleep 602
          - run: echo done >> {marks}
        """)
    p = subprocess.Popen(command("run", str(rb)), env={**os.environ, **env},
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    wait_for((tmp_path / "again").exists, timeout=20)
    p.kill()
    p.wait(timeout=30)
    first = int(marks.read_text().split()[1])
    assert os.path.exists(f"/proc/{first}")  # the step outlived its driver
    run_id = json.loads(opsrun("runs", "--json", env=env).stdout)["runs"][0]["id"]
    r = opsrun("resume", run_id, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not alive(first)
    begun, again, done = marks.read_text().splitlines()
    assert begun.startswith("begin ") and again.startswith("begin ") and done == "done"
    kinds = [(x["kind"], x.get("run_id")) for x in audit_records(env)]
    assert kinds.index(("run.orphans_stopped", run_id)) < kinds.index(
        ("run.interrupted", run_id)) < kinds.index(("run.resumed", run_id))
