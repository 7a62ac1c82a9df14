"""The runbook model: what a valid file becomes, and how runbooks are found."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from opsrun import shell_words
from opsrun.errors import RunbookInvalid, UsageError
from opsrun.runbook import (
    Approvers,
    EventTrigger,
    FileTrigger,
    LogTrigger,
    Retry,
    ScheduleTrigger,
    find_runbook,
    load_runbook,
    load_runbooks,
    runbook_files,
)
from tests.helpers.files import write

FIXTURES = Path(__file__).parent / "fixtures"
DESIGN_EXAMPLE = FIXTURES / "restart-web-on-oom.yaml"  # DESIGN.md section 2, verbatim


# ── the design's example ────────────────────────────────────────────────────

def test_design_example_is_the_one_in_design_md() -> None:
    design = Path("/work/shared/DESIGN.md")
    if not design.exists():
        pytest.skip("DESIGN.md is not next to the repository here")
    block = re.search(r"```yaml\n(.*?)```", design.read_text(), re.S)
    assert block is not None
    assert DESIGN_EXAMPLE.read_text() == block.group(1)


def test_design_example_model() -> None:
    rb = load_runbook(DESIGN_EXAMPLE)
    assert rb.name == "restart-web-on-oom"
    assert rb.description == "Restart the web service when the kernel kills it."
    assert rb.path == DESIGN_EXAMPLE
    assert rb.sha256 == hashlib.sha256(DESIGN_EXAMPLE.read_bytes()).hexdigest()
    assert rb.timeout_s == 15 * 60
    assert rb.env == {"SERVICE": "${{ params.service }}"}
    assert (rb.concurrency.key, rb.concurrency.policy) == ("${{ event.proc }}", "queue")

    log, file, schedule, event = rb.triggers
    assert isinstance(log, LogTrigger)
    assert log.path == "/var/log/kern.log"
    assert log.start_at == "end"
    assert log.pattern is not None and list(log.pattern.groupindex) == ["proc"]
    assert isinstance(file, FileTrigger)
    assert file.paths == ("/srv/drop/*.csv",)
    assert file.events == ("added", "modified")
    assert file.debounce_s == pytest.approx(0.2)
    assert file.ignore == ()
    assert isinstance(schedule, ScheduleTrigger)
    assert (schedule.cron, schedule.timezone, schedule.catch_up, schedule.jitter_s) == (
        "*/15 * * * *", "Europe/Berlin", "last", 0.0)
    assert isinstance(event, EventTrigger)
    assert [(c.field, c.op, c.value) for c in event.where.conditions] == [
        ("type", "eq", "alert"),
        ("severity", "in", ["critical", "high"]),
        ("labels.host", "regex", r"^web-\d+$"),
    ]
    # An event trigger means any field may come.
    assert rb.event_fields() is None

    service, dry = rb.params["service"], rb.params["dry"]
    assert (service.type, service.default, service.pattern) == ("string", "web", "^[a-z-]+$")
    assert (dry.type, dry.default, dry.required) == ("bool", False, False)

    status, approve, restart, fleet = rb.steps
    assert (status.id, status.kind, status.position) == ("status", "run", 0)
    assert status.run == 'systemctl is-active "$SERVICE"'
    assert status.continue_on_error is True
    assert status.shell == "bash" and status.plan is not None
    assert (approve.kind, approve.run) == ("confirm", None)
    assert approve.confirm == "Restart ${{ params.service }} (was killed: ${{ event.proc }})?"
    assert approve.approvers == Approvers(users=("root",), groups=("ops",), not_starter=False)
    assert (approve.timeout_s, approve.on_timeout) == (30 * 60, "deny")
    assert restart.condition == "steps.status.exit_code != 0 or event.proc == 'gunicorn'"
    assert restart.retry == Retry(attempts=3, delay_s=2.0, backoff=2.0)
    assert restart.timeout_s == 60
    assert fleet.hosts == ("web-1", "web-2", "group:web")
    assert fleet.parallel == 10
    assert fleet.timeout_s is None and fleet.retry == Retry()

    (failure,) = rb.on_failure
    assert failure.id == "on_failure-1" and failure.explicit_id is False
    assert failure.title == 'logger -t opsrun "restart of $SERVICE failed"'
    assert rb.on_denied == ()
    assert [s.id for s in rb.all_steps()] == ["status", "approve", "restart", "fleet",
                                              "on_failure-1"]


def test_model_is_immutable() -> None:
    rb = load_runbook(DESIGN_EXAMPLE)
    with pytest.raises(AttributeError):
        rb.name = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        rb.steps[0].run = "rm -rf /"  # type: ignore[misc]


# ── smaller forms ───────────────────────────────────────────────────────────

def test_minimal_runbook_and_defaults(tmp_path: Path) -> None:
    rb = load_runbook(write(tmp_path, "say-hello.yaml", "steps:\n  - run: echo hello\n"))
    assert rb.name == "say-hello"  # from the file's stem
    assert rb.triggers == () and rb.params == {} and rb.env == {}
    assert rb.description == "" and rb.timeout_s is None
    assert (rb.concurrency.key, rb.concurrency.policy) == ("", "queue")
    (step,) = rb.steps
    assert step.id == "step-1" and step.explicit_id is False and step.title == "echo hello"
    assert (step.kind, step.shell, step.parallel, step.hosts) == ("run", "bash", 1, ())
    assert step.approvers.anyone and step.on_timeout == "deny"
    assert rb.event_fields() is None  # manual only: params and whatever is given


def test_yml_extension_and_name_from_stem(tmp_path: Path) -> None:
    rb = load_runbook(write(tmp_path, "rotate.logs.yml", "steps:\n  - run: logrotate -f x\n"))
    assert rb.name == "rotate.logs"


@pytest.mark.parametrize("text, approvers", [
    ("[alice, \"group:ops\"]", Approvers(("alice",), ("ops",), False)),
    ("alice", Approvers(("alice",), (), False)),
    ("\"group:dba\"", Approvers((), ("dba",), False)),
    ("{users: [alice, bob], groups: [ops], not_starter: true}",
     Approvers(("alice", "bob"), ("ops",), True)),
    ("{users: alice}", Approvers(("alice",), (), False)),
    ("{groups: ops}", Approvers((), ("ops",), False)),
    ("{users: [\"group:sre\", carol]}", Approvers(("carol",), ("sre",), False)),
    ("{groups: [\"group:dba\"]}", Approvers((), ("dba",), False)),
    ("{not_starter: true}", Approvers((), (), True)),
])
def test_approvers_forms(tmp_path: Path, text: str, approvers: Approvers) -> None:
    rb = load_runbook(write(tmp_path, "a.yaml", f"steps:\n  - confirm: ok?\n    approvers: {text}\n"
                                                "  - run: echo ok\n"))
    assert rb.steps[0].approvers == approvers


@pytest.mark.parametrize("text, retry", [
    ("3", Retry(attempts=3)),
    ("{attempts: 5}", Retry(attempts=5, delay_s=1.0, backoff=1.0)),
    ("{delay: 500ms}", Retry(attempts=3, delay_s=0.5, backoff=1.0)),
    ("{attempts: 2, delay: 1m, backoff: 1.5}", Retry(attempts=2, delay_s=60.0, backoff=1.5)),
])
def test_retry_forms(tmp_path: Path, text: str, retry: Retry) -> None:
    rb = load_runbook(write(tmp_path, "r.yaml", f"steps:\n  - run: curl -f x\n    retry: {text}\n"))
    assert rb.steps[0].retry == retry


def test_on_as_a_mapping(tmp_path: Path) -> None:
    rb = load_runbook(write(tmp_path, "m.yaml", """\
on:
  schedule: {cron: "0 3 * * *"}
  log: {path: /var/log/syslog, match: 'error (?P<code>\\d+)', from: start}
steps:
  - run: echo ${{ event.code }} ${{ event.scheduled_for }}
"""))
    schedule, log = rb.triggers
    assert isinstance(schedule, ScheduleTrigger) and schedule.timezone == "UTC"
    assert schedule.catch_up == "none"
    assert isinstance(log, LogTrigger) and log.start_at == "start"
    assert rb.event_fields() == {"source", "id", "time", "scheduled_for", "missed", "path",
                                 "line", "lineno", "code"}


def test_on_with_an_empty_event_trigger(tmp_path: Path) -> None:
    rb = load_runbook(write(tmp_path, "e.yaml", "on:\n  - event:\nsteps:\n  - run: echo hi\n"))
    (trigger,) = rb.triggers
    assert isinstance(trigger, EventTrigger) and trigger.where.conditions == ()


def test_single_values_where_lists_are_expected(tmp_path: Path) -> None:
    write(tmp_path, "inventory.yaml", "hosts:\n  web-1: {hostname: 192.0.2.1}\n"
                                      "  db-1: {hostname: 192.0.2.2}\n")
    rb = load_runbook(write(tmp_path, "s.yaml", """\
on:
  - file: {paths: /srv/in/*.csv, events: added, ignore: "*.tmp"}
steps:
  - hosts: web-1
    run: uptime
  - host: db-1
    run: uptime
"""))
    (file,) = rb.triggers
    assert isinstance(file, FileTrigger)
    assert (file.paths, file.events, file.ignore) == (("/srv/in/*.csv",), ("added",),
                                                       ("*.tmp",))
    assert rb.steps[0].hosts == ("web-1",) and rb.steps[1].hosts == ("db-1",)


def test_step_fields(tmp_path: Path) -> None:
    rb = load_runbook(write(tmp_path, "f.yaml", """\
params:
  dir: {type: string, default: /tmp}
steps:
  - id: build
    name: Build it
    run: make
    workdir: ${{ params.dir }}
    env: {CC: gcc, JOBS: 4, DEBUG: false}
    shell: bash -euo pipefail
    if: true
    timeout: 1h30m
  - run: print("hi")
    shell: python3
    if: steps.build.exit_code == 0
"""))
    build, py = rb.steps
    assert (build.id, build.name, build.title) == ("build", "Build it", "Build it")
    assert build.workdir == "${{ params.dir }}"
    assert build.env == {"CC": "gcc", "JOBS": "4", "DEBUG": "false"}
    assert build.shell == "bash -euo pipefail" and build.plan is not None
    assert build.condition is True and build.timeout_s == 5400
    assert py.shell == "python3" and py.plan is None  # no quoting plan for a non-POSIX shell
    assert py.condition == "steps.build.exit_code == 0"


def test_run_plan_holds_the_slots(tmp_path: Path) -> None:
    rb = load_runbook(write(tmp_path, "p.yaml", """\
on: [{file: {paths: /in/*}}]
steps:
  - run: |
      gzip -k ${{ event.path }}
      echo "done: ${{ event.path }}"
"""))
    plan = rb.steps[0].plan
    assert plan is not None
    slots = [p for p in plan.parts if isinstance(p, shell_words.Slot)]
    assert [(s.expr.source, s.context) for s in slots] == [("event.path", "code"),
                                                          ("event.path", "dquote")]


def test_on_failure_and_on_denied_can_read_main_steps(tmp_path: Path) -> None:
    rb = load_runbook(write(tmp_path, "o.yaml", """\
steps:
  - id: deploy
    run: ./deploy.sh
on_failure:
  - id: tell
    run: echo "${{ steps.deploy.stderr }} at ${{ run.failed_step }}"
  - run: echo "${{ steps.tell.exit_code }}"
on_denied:
  - run: echo "${{ steps.deploy.outcome }}"
"""))
    assert [s.id for s in rb.on_failure] == ["tell", "on_failure-2"]
    assert [s.id for s in rb.on_denied] == ["on_denied-1"]


def test_unknown_top_level_key_is_refused_even_as_an_anchor(tmp_path: Path) -> None:
    path = write(tmp_path, "anchors.yaml", "x-common: &c {timeout: 30s}\nsteps:\n"
                                           "  - <<: *c\n    run: ./a.sh\n")
    with pytest.raises(RunbookInvalid) as exc:
        load_runbook(path)
    assert "unknown key 'x-common'" in str(exc.value)


def test_merge_keys_in_steps(tmp_path: Path) -> None:
    path = write(tmp_path, "m.yaml", """\
steps:
  - &probe {id: probe, run: curl -f localhost, timeout: 5s, retry: 3}
  - <<: *probe
    id: probe_again
    timeout: 10s
""")
    first, second = load_runbook(path).steps
    assert (second.id, second.run, second.timeout_s, second.retry.attempts) == (
        "probe_again", "curl -f localhost", 10.0, 3)
    assert first.timeout_s == 5.0


def test_invalid_runbook_raises_with_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", "steps:\n  - run: x\n    retyr: 1\n  - confirm: 1\n")
    with pytest.raises(RunbookInvalid) as exc:
        load_runbook(path)
    assert len(exc.value.problems) == 2
    assert exc.value.exit_code == 2
    assert all(p.file == str(path) for p in exc.value.problems)


# ── folders and finding runbooks ────────────────────────────────────────────

def make_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "runbooks"
    write(folder, "hello.yaml", "steps:\n  - run: echo hi\n")
    write(folder, "backup.yml", "name: nightly-backup\nsteps:\n  - run: ./backup.sh\n")
    write(folder, "team/deploy.yaml", "steps:\n  - run: ./deploy.sh\n")
    write(folder, "inventory.yaml", "web-1: {hostname: 10.0.0.1}\n")
    write(folder, "team/inventory.yml", "db-1: {hostname: 10.0.0.2}\n")
    write(folder, ".hidden.yaml", "this: is not: a runbook\n")
    write(folder, ".git/config.yaml", "not: [a runbook\n")
    write(folder, ".drafts/wip.yaml", "steps: {}\n")
    write(folder, "notes.txt", "not yaml\n")
    write(folder, "README.md", "# runbooks\n")
    return folder


def test_runbook_files_skips_inventories_and_hidden(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    assert [p.relative_to(folder).as_posix() for p in runbook_files(folder)] == [
        "backup.yml", "hello.yaml", "team/deploy.yaml"]


def test_load_runbooks_from_a_folder(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    runbooks, problems = load_runbooks([folder])
    assert problems == []
    assert sorted(rb.name for rb in runbooks) == ["deploy", "hello", "nightly-backup"]


def test_load_runbooks_reports_missing_paths(tmp_path: Path) -> None:
    runbooks, problems = load_runbooks([tmp_path / "nope"])
    assert runbooks == []
    assert [(p.line, p.message) for p in problems] == [(0, "no such file or folder")]


def test_load_runbooks_keeps_the_valid_ones(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    write(folder, "broken.yaml", "steps:\n  - run: x\n    timeout: soon\n")
    runbooks, problems = load_runbooks([folder])
    assert len(runbooks) == 3
    assert [(Path(p.file).name, p.line, p.col) for p in problems] == [("broken.yaml", 3, 14)]


def test_find_runbook_by_name_and_by_path(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    assert find_runbook("hello", folder).name == "hello"
    assert find_runbook("nightly-backup", folder).path.name == "backup.yml"  # by `name:`
    assert find_runbook("backup", folder).name == "nightly-backup"  # by file stem
    assert find_runbook("deploy", folder).path == folder / "team" / "deploy.yaml"
    by_path = find_runbook(str(folder / "hello.yaml"), tmp_path / "elsewhere")
    assert by_path.name == "hello"
    rel = find_runbook("runbooks/team/deploy.yaml", folder)  # relative to the cwd
    assert rel.name == "deploy"


def test_find_runbook_errors(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    with pytest.raises(UsageError, match="no runbook named 'helo' in .*did you mean 'hello'"):
        find_runbook("helo", folder)
    with pytest.raises(UsageError, match="no runbook file"):
        find_runbook(str(folder / "nope.yaml"), folder)
    with pytest.raises(UsageError, match="the runbooks folder .* does not exist"):
        find_runbook("hello", tmp_path / "missing")
    write(folder, "broken.yaml", "steps: []\n")
    with pytest.raises(RunbookInvalid):
        find_runbook("broken", folder)


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
