"""validate, list, show and schema through the real entry point."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from opsrun import __version__
from opsrun.yaml_load import load_file
from tests.helpers.cli import no_traceback, opsrun

BAD = """\
name: broken
steps:
  - id: one
    run: echo ${{ params.nope }}
    timout: 5s
"""


def _bad_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "rb"
    folder.mkdir()
    (folder / "broken.yaml").write_text(BAD)
    (folder / "good.yaml").write_text("steps:\n  - run: 'true'\n")
    return folder


def test_version() -> None:
    r = opsrun("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"opsrun {__version__}"


def test_help_lists_commands() -> None:
    r = opsrun("--help")
    assert r.returncode == 0
    for cmd in ("validate", "list", "show", "schema", "completion"):
        assert cmd in r.stdout


def test_validate_examples(repo_root: Path) -> None:
    r = opsrun("validate", cwd=repo_root)
    assert r.returncode == 0, r.stdout + r.stderr
    *warnings, last = r.stdout.splitlines()
    assert re.fullmatch(r"\d+ runbooks valid", last), r.stdout
    # deploy.yaml names group:ops, which this machine may not have
    assert all(": warning: " in w and "group 'ops'" in w for w in warnings), warnings


def test_validate_warns_of_an_approvers_group_this_machine_lacks(tmp_path: Path) -> None:
    rb = tmp_path / "ask.yaml"
    rb.write_text("steps:\n  - confirm: Go?\n    approvers: [alice, 'group:root',"
                  " 'group:no-such-group-zz']\n  - confirm: Again?\n    approvers:"
                  " {groups: nosuch-zz2}\n")
    r = opsrun("validate", str(rb))
    assert r.returncode == 0, r.stdout
    assert r.stdout.splitlines() == [
        f"{rb}:3:38: warning: steps[0].approvers[2]: there is no group 'no-such-group-zz' on "
        "this machine (`getent group` does not know it), so nobody can answer as one of its "
        "members; check the name",
        f"{rb}:5:25: warning: steps[1].approvers.groups: there is no group 'nosuch-zz2' on "
        "this machine (`getent group` does not know it), so nobody can answer as one of its "
        "members; check the name",
        "1 runbook valid"]
    doc = json.loads(opsrun("validate", str(rb), "--json").stdout)
    assert doc["ok"] and [w["line"] for w in doc["warnings"]] == [3, 5]
    run = opsrun("run", str(rb), "--dry-run")
    assert "warning: steps[0].approvers[2]" in run.stderr and run.returncode == 0


def test_validate_reports_every_problem(tmp_path: Path) -> None:
    folder = _bad_folder(tmp_path)
    r = opsrun("validate", str(folder))
    assert r.returncode == 2
    assert no_traceback(r)
    lines = r.stdout.splitlines()
    f = folder / "broken.yaml"
    assert lines[0] == f"{f}:4:15: error: steps[0].run: unknown param 'nope'; known: none"
    assert lines[1].startswith(f"{f}:5:5: error: steps[0].timout: unknown key 'timout' in a "
                               "step (did you mean 'timeout'?)")
    assert lines[-1] == "2 problems in 1 file; 1 runbook valid"


def test_validate_json(tmp_path: Path) -> None:
    folder = _bad_folder(tmp_path)
    r = opsrun("validate", "--json", str(folder))
    assert r.returncode == 2
    data = json.loads(r.stdout)
    assert data["ok"] is False
    assert [rb["name"] for rb in data["runbooks"]] == ["good"]
    assert {(p["line"], p["col"]) for p in data["problems"]} == {(4, 15), (5, 5)}


def test_validate_github_format(tmp_path: Path) -> None:
    folder = _bad_folder(tmp_path)
    r = opsrun("validate", "--format", "github", str(folder))
    assert r.returncode == 2
    first = r.stdout.splitlines()[0]
    assert first.startswith(f"::error file={folder / 'broken.yaml'},line=4,col=15::")


def test_validate_missing_path(tmp_path: Path) -> None:
    r = opsrun("validate", str(tmp_path / "nope"))
    assert r.returncode == 2
    assert f"{tmp_path / 'nope'}: error: no such file or folder" in r.stdout


def test_list_table_and_json(repo_root: Path) -> None:
    r = opsrun("list", cwd=repo_root)
    assert r.returncode == 0
    assert r.stdout.splitlines()[0].split() == ["NAME", "TRIGGERS", "STEPS", "FILE"]
    assert "\x1b[" not in r.stdout  # not a terminal: plain text
    assert re.search(r"^hello\s+manual\s+3\s+runbooks/hello.yaml$", r.stdout, re.M)
    data = json.loads(opsrun("list", "--json", cwd=repo_root).stdout)
    names = {rb["name"] for rb in data["runbooks"]}
    assert {"hello", "deploy", "disk-cleanup", "csv-drop", "disk-full-alert",
            "nginx-upstream-timeout"} <= names


def test_list_reports_invalid_files(tmp_path: Path) -> None:
    folder = _bad_folder(tmp_path)
    r = opsrun("list", "--runbooks", str(folder))
    assert r.returncode == 2
    assert "good" in r.stdout
    assert "broken.yaml" in r.stderr and "opsrun validate" in r.stderr


def test_show_by_name_and_path(repo_root: Path) -> None:
    by_name = opsrun("show", "deploy", cwd=repo_root)
    by_path = opsrun("show", "runbooks/deploy.yaml", cwd=repo_root)
    assert by_name.returncode == 0 and by_path.stdout == by_name.stdout
    text = by_name.stdout
    assert "confirm: Deploy ${{ params.version }} to all web hosts?" in text
    assert "approvers: root, group:ops (not the user who started the run)" in text
    assert "on hosts: group:web (10 at once)" in text
    assert "if: params.canary" in text


def test_show_unknown_name_suggests(repo_root: Path) -> None:
    r = opsrun("show", "helo", cwd=repo_root)
    assert r.returncode == 2
    assert no_traceback(r)
    assert "no runbook named 'helo'" in r.stderr and "did you mean 'hello'?" in r.stderr


def test_debug_shows_traceback(repo_root: Path) -> None:
    r = opsrun("--debug", "show", "helo", cwd=repo_root)
    assert r.returncode == 2
    assert "Traceback (most recent call last)" in r.stderr


def test_schema_is_published_and_in_sync(repo_root: Path) -> None:
    r = opsrun("schema")
    assert r.returncode == 0
    published = repo_root / "opsrun" / "schema" / "runbook.schema.json"
    assert r.stdout == published.read_text(), (
        "opsrun/schema/runbook.schema.json is stale; regenerate it with "
        "`opsrun schema > opsrun/schema/runbook.schema.json`")
    jsonschema.Draft202012Validator.check_schema(json.loads(r.stdout))


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parent.parent / "runbooks").glob("*.yaml")
                                        if p.name != "inventory.yaml"))
def test_examples_match_schema(repo_root: Path, name: str) -> None:
    schema = json.loads((repo_root / "opsrun" / "schema" / "runbook.schema.json").read_text())
    data = load_file(repo_root / "runbooks" / name).data
    jsonschema.Draft202012Validator(schema).validate(data)
    first = (repo_root / "runbooks" / name).read_text().splitlines()[0]
    assert first.startswith("# yaml-language-server: $schema=")


def test_schema_rejects_what_validator_rejects(repo_root: Path) -> None:
    schema = json.loads((repo_root / "opsrun" / "schema" / "runbook.schema.json").read_text())
    v = jsonschema.Draft202012Validator(schema)
    assert not v.is_valid({"steps": [{"run": "x", "retyr": 3}]})
    assert not v.is_valid({"steps": [{"run": "x", "timeout": "2 secs"}]})
    assert not v.is_valid({"steps": []})
    assert not v.is_valid({"on": [{"cron": {}}], "steps": [{"run": "x"}]})


@pytest.mark.parametrize("tz, utc_line, berlin_line", [
    ("UTC", r"next: \d{4}-\d\d-\d\d 03:00:00 UTC$",
     r"next: \d{4}-\d\d-\d\d 02:00:00 UTC \(Europe/Berlin: \d{4}-\d\d-\d\d 03:00:00 CET\)$"),
    ("Europe/Berlin", r"next: \d{4}-\d\d-\d\d 04:00:00 CET \(UTC: \d{4}-\d\d-\d\d 03:00:00 UTC\)$",
     r"next: \d{4}-\d\d-\d\d 03:00:00 CET$"),
])
def test_sources_name_the_zone_of_each_time(tmp_path: Path, tz: str, utc_line: str,
                                            berlin_line: str) -> None:
    folder = tmp_path / "rb"
    folder.mkdir()
    (folder / "a.yaml").write_text('on: [{schedule: {cron: "0 3 * * *"}}]\n'
                                   "steps: [{run: 'true'}]\n")
    (folder / "b.yaml").write_text('on: [{schedule: {cron: "0 3 * * *", timezone: '
                                   "Europe/Berlin}}]\nsteps: [{run: 'true'}]\n")
    # In winter the next fires fall in CET; in summer the same lines say CEST.
    r = opsrun("sources", "-r", str(folder), env={"TZ": tz})
    assert r.returncode == 0, r.stderr
    text = r.stdout.split("  b: ")
    assert "local" not in r.stdout and "+00:00" not in r.stdout
    if "CEST" not in r.stdout:  # the summer form is the same with CEST
        assert re.search(utc_line, text[0], re.M), r.stdout
        assert re.search(berlin_line, text[1], re.M), r.stdout


def test_show_json_of_every_example(repo_root: Path) -> None:
    for rb in sorted((repo_root / "runbooks").glob("*.yaml")):
        if rb.name == "inventory.yaml":
            continue
        r = opsrun("show", str(rb), "--json", cwd=repo_root)
        assert r.returncode == 0 and no_traceback(r), (rb, r.stderr)
        doc = json.loads(r.stdout)
        assert doc["name"] and doc["steps"], rb


def test_show_json_has_the_retry_settings(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(
        "steps:\n  - id: flaky\n    run: ./x\n    retry: {attempts: 4, delay: 1s, backoff: 2,"
        " max_delay: 5s, jitter: full, on: failure, on_exit_codes: [75]}\n")
    doc = json.loads(opsrun("show", str(tmp_path / "r.yaml"), "--json").stdout)
    assert doc["steps"][0]["retry"] == {"attempts": 4, "delay_s": 1.0, "backoff": 2.0,
                                        "max_delay_s": 5.0, "jitter": "full",
                                        "on": ["failure"], "on_exit_codes": [75]}
    text = opsrun("show", str(tmp_path / "r.yaml")).stdout
    assert ("retry 4 times, 1.0s apart, backoff ×2, at most 5.0s, full jitter, on failure, after "
            "exit code 75") in text
