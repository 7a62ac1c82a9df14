"""Flow control through the real CLI: branches and loops as real processes, a used
runbook, emitted events picked up by the service, and the chain guard."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from opsrun.engine import MAX_CHAIN_DEPTH
from tests.helpers.cli import command, no_traceback, on_terminal, opsrun
from tests.helpers.files import audit, write
from tests.helpers.procs import alive
from tests.helpers.service import Service
from tests.helpers.wait import wait_for

# A step that waits (with a deadline) for a file another branch creates: it can only
# succeed when both run at the same time.
MEET = ('touch {me}; for _ in $(seq 2000); do [ -e {other} ] && break; sleep 0.005; done; '
        '[ -e {other} ]')


@pytest.fixture
def flow(tmp_path: Path) -> Path:
    d = tmp_path / "rb"
    write(d, "restart.yaml", """\
        params:
          service: {type: string, required: true}
        steps:
          - id: go
            run: echo "pid=4${{ params.service | length }}" >> "$OPSRUN_OUTPUT"
        outputs:
          pid: ${{ steps.go.outputs.pid }}
        """)
    write(d, "main.yaml", f"""\
        steps:
          - id: both
            parallel:
              a:
                - id: ma
                  run: {MEET.format(me=tmp_path / 'a', other=tmp_path / 'b')}
              b:
                - id: mb
                  run: {MEET.format(me=tmp_path / 'b', other=tmp_path / 'a')}
          - id: each
            for_each: ${{{{ event.units }}}}
            max_parallel: 3
            uses: restart
            with:
              service: ${{{{ item }}}}
          - id: after
            run: echo "pids ${{{{ steps.each.items | map(attribute='outputs') | map(attribute='pid') | join(',') }}}}"
        on_success:
          - id: done
            run: echo finished
        """)
    return d


def test_branches_loops_and_a_used_runbook_run_for_real(flow: Path,
                                                       env: dict[str, str]) -> None:
    r = opsrun("run", str(flow / "main.yaml"), "--event", '{"units": ["ab", "abc", "x"]}',
               "--json", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    steps = {s["id"]: s for s in doc["steps"]}
    assert steps["after"]["stdout"] == "pids 42,43,41\n"
    assert steps["done"]["stdout"] == "finished\n"
    assert {"ma", "mb", "each[0].go", "each[2].go", "each[0]", "both"} <= set(steps)
    records = audit(Path(env["OPSRUN_STATE_DIR"]))
    children = [x for x in records if x["kind"] == "run.child_started"]
    # Three at a time: they start in any order.
    assert sorted(c["child_run"] for c in children) == [f"{doc['run']['id']}/each[{i}]"
                                                        for i in range(3)]
    assert all(c["runbook"]["name"] == "restart" and len(c["runbook"]["sha256"]) == 64
               for c in children)
    assert opsrun("audit", "verify", env=env).returncode == 0
    # The store keeps the nested steps under their step, in order: `opsrun logs` shows them.
    logs = opsrun("logs", doc["run"]["id"], env=env).stdout
    assert logs.index("[both]") < logs.index("[ma]") < logs.index("[each]") < \
        logs.index("[after]")


def test_dry_run_and_show_spell_out_the_nested_steps(flow: Path, env: dict[str, str],
                                                    repo_root: Path) -> None:
    r = opsrun("run", str(flow / "main.yaml"), "--dry-run", "--event", '{"units": ["web"]}',
               env=env)
    assert r.returncode == 0, r.stderr
    assert "both: would run (2 branches at once: a, b; the first failure stops" in r.stdout
    assert "[both/a] ma: would run" in r.stdout
    assert "each: would run (for each of 1 item; shown for the first)" in r.stdout
    assert "uses: restart with service=web" in r.stdout
    assert "[each → restart] go: would run" in r.stdout
    assert not Path(env["OPSRUN_STATE_DIR"], "audit.jsonl").exists() or all(
        x["kind"] != "step.started" for x in audit(Path(env["OPSRUN_STATE_DIR"])))
    shown = opsrun("show", str(flow / "main.yaml"), env=env).stdout
    assert "branch a:" in shown and "uses: restart (" in shown
    assert "for each item of ${{ event.units }}, 3 at a time" in shown
    doc = json.loads(opsrun("show", str(flow / "main.yaml"), "--json", env=env).stdout)
    assert list(doc["steps"][0]["branches"]) == ["a", "b"]
    assert doc["steps"][1]["uses_file"].endswith("restart.yaml")
    example = opsrun("run", "runbooks/alert-triage.yaml", "--dry-run", "--event", json.dumps(
        {"status": "firing", "alerts": [{"status": "firing", "labels": {
            "alertname": "ServiceDown", "unit": "nginx"}}]}), cwd=repo_root, env=env)
    assert example.returncode == 0, example.stderr
    assert "$ systemctl restart nginx" in example.stdout


def test_on_a_terminal_lines_of_side_by_side_steps_say_whose_they_are(
        tmp_path: Path, env: dict[str, str]) -> None:
    # Each prints once both have started, and ends once both have printed.
    l1, r1, l2, r2 = (tmp_path / n for n in ("l1", "r1", "l2", "r2"))
    rb = write(tmp_path, "two.yaml", f"""\
        steps:
          - parallel:
              a: [{{id: left, run: "{MEET.format(me=l1, other=r1)}; echo from-left; {MEET.format(me=l2, other=r2)}"}}]
              b: [{{id: right, run: "{MEET.format(me=r1, other=l1)}; echo from-right; {MEET.format(me=r2, other=l2)}"}}]
          - id: alone
            run: echo by-itself
        """)
    code, out = on_terminal("run", str(rb), env=env)
    assert code == 0, out
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out)
    assert "left │ from-left" in out and "right │ from-right" in out
    assert "alone │" not in out and "by-itself" in out


def test_ctrl_c_stops_every_branch_process(tmp_path: Path, env: dict[str, str]) -> None:
    pids = [tmp_path / "p1", tmp_path / "p2"]
    rb = write(tmp_path, "long.yaml", f"""\
        steps:
          - parallel:
              one: [{{id: one, run: "echo $$ > {pids[0]}; exec sleep 600"}}]
              two: [{{id: two, run: "echo $$ > {pids[1]}; exec sleep 600"}}]
        """)
    p = subprocess.Popen(command("run", str(rb)), env={**os.environ, **env},
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    wait_for(lambda: all(f.exists() and f.read_text().strip() for f in pids), timeout=20)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130, out + err
    assert no_traceback(subprocess.CompletedProcess([], p.returncode, out, err))
    assert not any(alive(int(f.read_text())) for f in pids)


def test_a_wrong_for_each_value_fails_the_run_with_a_message(tmp_path: Path,
                                                            env: dict[str, str]) -> None:
    rb = write(tmp_path, "w.yaml", """\
        steps:
          - id: each
            for_each: ${{ event.units }}
            run: echo ${{ item }}
        """)
    r = opsrun("run", str(rb), "--event", '{"units": "web"}', env=env)
    assert r.returncode == 1 and no_traceback(r)
    assert "for_each: `${{ event.units }}` gave a text, not a list" in r.stdout + r.stderr



def test_emitted_events_start_other_runbooks_and_a_loop_is_cut(
        tmp_path: Path, services: list[Service]) -> None:
    d = tmp_path / "rb"
    out = tmp_path / "out"
    write(d, "first.yaml", """\
        on: [{event: {where: {type: start}}}]
        steps:
          - id: tell
            emit: {type: next, host: "${{ event.host }}"}
        """)
    write(d, "second.yaml", f"""\
        on: [{{event: {{where: {{type: next}}}}}}]
        steps:
          - run: echo "second ${{{{ event.host }}}} ${{{{ event.emitted_by.runbook }}}}" >> {out}
        """)
    write(d, "loop.yaml", """\
        on: [{event: {where: {type: loop}}}]
        steps:
          - id: again
            emit: {type: loop}
        """)
    svc = Service(tmp_path, d)
    services.append(svc)
    svc.start()
    assert svc.cli("emit", '{"type": "start", "host": "web-1"}').returncode == 0
    wait_for(lambda: out.exists() and out.read_text() == "second web-1 first\n", timeout=20)
    assert svc.cli("emit", '{"type": "loop"}').returncode == 0

    def refused() -> list[dict]:
        return [x for x in svc.audit() if x["kind"] == "step.finished"
                and x.get("step_id") == "again" and x["outcome"] == "failure"]
    (cut,) = wait_for(refused, timeout=30)
    assert "refused" in cut["error"] and "chain" in cut["error"]
    wait_for(lambda: not [r for r in svc.runs() if r["state"] in ("queued", "running")],
             timeout=20)
    loops = [r for r in svc.runs() if r["runbook"] == "loop"]
    assert len(loops) == MAX_CHAIN_DEPTH + 1
    assert sorted(r["state"] for r in loops) == ["failed"] + ["succeeded"] * MAX_CHAIN_DEPTH
    assert svc.stop() == 0
