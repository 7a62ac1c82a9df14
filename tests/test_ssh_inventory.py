"""The inventory: its format, which one a runbook uses, and how host names are validated.

No SSH server is needed here; tests/test_ssh.py connects for real.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from opsrun.commands.init import INVENTORY as INIT_INVENTORY
from opsrun.errors import RunbookInvalid
from opsrun.inventory import Host, InventoryInvalid, load_inventory
from opsrun.runbook import load_runbook, load_runbooks
from tests.helpers.cli import no_traceback, opsrun

INVENTORY = """\
hosts:
  web-1: {hostname: 192.0.2.11, user: deploy, groups: [web]}
  web-2: {hostname: 192.0.2.12, port: 2222, groups: [web, canary]}
  db-1:
    hostname: db-1.example.internal
    key: ~/.ssh/id_db
    groups: db
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_inventory_is_read_with_every_field(tmp_path: Path) -> None:
    inv = load_inventory(write(tmp_path / "inventory.yaml", INVENTORY))
    assert inv.hosts["web-1"] == Host("web-1", "192.0.2.11", None, "deploy", None, ("web",))
    assert inv.hosts["web-2"].port == 2222
    assert inv.hosts["db-1"] == Host("db-1", "db-1.example.internal", None, None,
                                     "~/.ssh/id_db", ("db",))
    assert inv.groups == {"web": ["web-1", "web-2"], "canary": ["web-2"], "db": ["db-1"]}
    # Groups expand in the inventory's order; a host named twice runs once.
    names = [h.name for h in inv.expand(["db-1", "group:web", "web-1", "group:canary"])]
    assert names == ["db-1", "web-1", "web-2"]


def test_the_examples_opsrun_init_writes_and_the_repo_keeps_are_valid(repo_root: Path,
                                                                      tmp_path: Path) -> None:
    assert load_inventory(write(tmp_path / "inventory.yaml", INIT_INVENTORY)).groups == {
        "web": ["web-1", "web-2"], "db": ["db-1"]}
    assert set(load_inventory(repo_root / "runbooks" / "inventory.yaml").groups) == {"web", "db"}


@pytest.mark.parametrize("text, where, fragment", [
    ("hosts:\n  web-1: {hostname: 192.0.2.1, password: hunter2}\n", (2, 32),
     "hosts.web-1.password: `password` is refused: opsrun never keeps passwords"),
    ("hosts:\n  web-1:\n    hostname: 192.0.2.1\n    ansible_ssh_pass: x\n", (4, 5),
     "`ansible_ssh_pass` is refused"),
    ("hosts:\n  web-1: {hostname: 192.0.2.1, port: 99999}\n", (2, 38),
     "hosts.web-1.port: must be at most 65535"),
    ("hosts:\n  web-1: {address: 192.0.2.1}\n", (2, 10),
     "hosts.web-1: a host is missing the required key 'hostname'"),
    ("hosts:\n  web-1: {hostname: 192.0.2.1, ip: 192.0.2.1}\n", (2, 32),
     "unknown key 'ip' in a host (did you mean 'hostname'?)"),
    ("web-1: {hostname: 192.0.2.1}\n", (1, 1),
     "the inventory lists its hosts under `hosts:`"),
    ("hosts:\n  web-1: {hostname: 192.0.2.1\n", (3, 1), "expected ',' or '}'"),
    ("hosts:\n  group:web: {hostname: 192.0.2.1}\n", (2, 3), "is not a valid name"),
])
def test_a_bad_inventory_says_what_and_where(tmp_path: Path, text: str, where: tuple[int, int],
                                             fragment: str) -> None:
    path = write(tmp_path / "inventory.yaml", text)
    with pytest.raises(InventoryInvalid) as e:
        load_inventory(path)
    assert any((p.line, p.col) == where and fragment in p.message and p.file == str(path)
               for p in e.value.problems), "\n".join(str(p) for p in e.value.problems)


def test_validate_reports_a_bad_inventory_once_and_each_runbook_that_needs_it(
        tmp_path: Path) -> None:
    folder = tmp_path / "rb"
    write(folder / "inventory.yaml", "hosts:\n  web-1: {hostname: 192.0.2.1, password: pw}\n")
    for name in ("a", "b"):
        write(folder / f"{name}.yaml", "steps:\n  - run: uptime\n    host: web-1\n")
    write(folder / "local.yaml", "steps:\n  - run: uptime\n")  # needs no inventory
    r = opsrun("validate", "rb", cwd=tmp_path)
    assert r.returncode == 2 and no_traceback(r)
    lines = r.stdout.splitlines()
    assert [ln for ln in lines if ln.startswith("rb/inventory.yaml")] == [
        "rb/inventory.yaml:2:32: error: hosts.web-1.password: `password` is refused: opsrun "
        "never keeps passwords in an inventory (anyone who reads the runbooks would read it) "
        "and logs in with keys only; set `key: ~/.ssh/id_ed25519` to a key file, or load the "
        "key into the SSH agent"]
    for name in ("a", "b"):
        assert (f"rb/{name}.yaml:3:5: error: steps[0].host: the host names cannot be checked: "
                "the inventory rb/inventory.yaml has problems (shown with its name); fix it "
                "first") in lines
    assert lines[-1] == "3 problems in 3 files; 1 runbook valid"
    # The inventory on its own, as a path.
    r = opsrun("validate", "rb/inventory.yaml", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout.startswith("rb/inventory.yaml:2:32: error:")


def test_unknown_hosts_and_groups_point_at_the_name(tmp_path: Path) -> None:
    write(tmp_path / "inventory.yaml", INVENTORY)
    path = write(tmp_path / "r.yaml", "steps:\n  - run: uptime\n    hosts: [web-1, wbe-2, "
                                      "\"group:dbs\"]\n")
    with pytest.raises(RunbookInvalid) as e:
        load_runbook(path)
    assert [(p.line, p.col, p.message) for p in e.value.problems] == [
        (3, 20, f"steps[0].hosts[1]: unknown host 'wbe-2' (did you mean 'web-2'?): it is not "
                f"in {tmp_path}/inventory.yaml and no `Host` line of ~/.ssh/config matches it; "
                "add it to the inventory"),
        (3, 27, f"steps[0].hosts[2]: unknown group 'dbs' (did you mean 'db'?); the groups of "
                f"{tmp_path}/inventory.yaml are canary, db, web")]


def test_without_an_inventory_a_host_needs_an_ssh_config_entry(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", "steps:\n  - run: uptime\n    hosts: [bastion, web-7, "
                                      "db-1, web-0]\n")
    write(Path.home() / ".ssh" / "config", "Host *\n  User nobody\nHost bastion web-* !web-0\n"
                                           "  HostName 192.0.2.99\n")
    with pytest.raises(RunbookInvalid) as e:
        load_runbook(path)
    assert [(p.col, p.message.split(":")[0]) for p in e.value.problems] == [
        (29, "steps[0].hosts[2]"), (35, "steps[0].hosts[3]")]
    assert "there is no inventory.yaml beside the runbook (give one with --inventory FILE)" \
        in e.value.problems[0].message
    write(Path.home() / ".ssh" / "config", "Host bastion web-* db-1 web-0\n")
    rb = load_runbook(path)
    # Names from ~/.ssh/config carry no address: the executor looks them up there.
    assert rb.steps[0].targets == (Host("bastion"), Host("web-7"), Host("db-1"), Host("web-0"))


def test_the_nearest_inventory_wins_and_inventory_option_overrides(tmp_path: Path) -> None:
    folder = tmp_path / "rb"
    write(folder / "inventory.yaml", "hosts:\n  web-1: {hostname: 192.0.2.1}\n")
    write(folder / "team" / "inventory.yml", "hosts:\n  db-1: {hostname: 192.0.2.2}\n")
    write(folder / "team" / "db.yaml", "steps:\n  - run: uptime\n    host: db-1\n")
    write(folder / "web.yaml", "steps:\n  - run: uptime\n    host: web-1\n")
    runbooks, problems = load_runbooks([folder])
    assert problems == [] and sorted(rb.name for rb in runbooks) == ["db", "web"]
    other = write(tmp_path / "other.yaml", "hosts:\n  db-1: {hostname: 192.0.2.3}\n"
                                           "  web-1: {hostname: 192.0.2.4}\n")
    runbooks, problems = load_runbooks([folder], inventory=other)
    assert problems == []
    assert {rb.name: rb.steps[0].targets[0].hostname for rb in runbooks} == {
        "db": "192.0.2.3", "web": "192.0.2.4"}


def test_inventory_option_must_name_a_file(tmp_path: Path) -> None:
    write(tmp_path / "rb" / "hello.yaml", "steps:\n  - run: echo hi\n")
    for args in (["run", "hello", "-r", "rb"], ["validate", "rb"], ["resume", "01X"],
                 ["watch", "-r", "rb"]):
        r = opsrun(*args, "--inventory", "nosuch.yaml", cwd=tmp_path)
        assert r.returncode == 2 and no_traceback(r)
        assert "--inventory nosuch.yaml: the file does not exist" in r.stderr


def test_a_password_in_a_runbook_step_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "inventory.yaml", INVENTORY)
    path = write(tmp_path / "r.yaml", "steps:\n  - run: uptime\n    host: web-1\n"
                                      "    ssh_password: x\n")
    with pytest.raises(RunbookInvalid) as e:
        load_runbook(path)
    (p,) = e.value.problems
    assert (p.line, p.col) == (4, 5)
    assert p.message.startswith("steps[0].ssh_password: `ssh_password` is refused: a runbook "
                                "never holds a password; SSH steps log in with keys")


def test_dry_run_shows_the_hosts_each_step_reaches(tmp_path: Path) -> None:
    write(tmp_path / "rb" / "inventory.yaml", INVENTORY)
    write(tmp_path / "rb" / "fleet.yaml", """\
steps:
  - id: one
    host: db-1
    run: uptime
  - id: all
    hosts: ["group:web", db-1]
    parallel: 10
    run: uptime
  - id: after
    if: steps.all.hosts['web-1'].exit_code == 0 and steps.one.hosts['db-1'].outcome == 'success'
    run: echo fine
""")
    r = opsrun("run", "fleet", "-r", "rb", "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "      on hosts: db-1\n" in r.stdout
    assert "      on hosts: web-1, web-2, db-1 (group:web; 3 at once)\n" in r.stdout
    r = opsrun("run", "fleet", "-r", "rb", "--dry-run", "--json", cwd=tmp_path)
    steps = json.loads(r.stdout)["steps"]
    assert [(s["id"], s["hosts"], s["parallel"]) for s in steps] == [
        ("one", ["db-1"], 1), ("all", ["web-1", "web-2", "db-1"], 10), ("after", [], None)]
