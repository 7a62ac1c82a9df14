"""`opsrun init` through the real command line: what a newcomer types first."""
from __future__ import annotations

import json
import re
from pathlib import Path

from opsrun.commands import schema
from opsrun.yaml_load import load_file
from tests.helpers.cli import no_traceback, opsrun

FILES = ("disk-usage.yaml", "inventory.yaml", ".opsrun/runbook.schema.json")


def test_creates_the_default_folder_that_validates_and_runs(tmp_path: Path) -> None:
    r = opsrun("init", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    folder = tmp_path / "runbooks"
    for name in FILES:
        assert (folder / name).is_file(), name
        assert f"created runbooks/{name}" in r.stdout
    # The next commands it prints are the ones that work from here.
    assert "opsrun validate runbooks" in r.stdout
    assert "opsrun run runbooks/disk-usage.yaml" in r.stdout
    assert "opsrun run disk-usage -p path=/var" in r.stdout

    v = opsrun("validate", cwd=tmp_path)
    assert v.returncode == 0, v.stdout + v.stderr
    assert v.stdout.strip() == "1 runbook valid"

    run = opsrun("run", "runbooks/disk-usage.yaml", "--state-dir", str(tmp_path / "state"),
                 cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"measure \| the disk holding / is \d+% full", run.stdout), run.stdout
    assert "[warn] skipped" in run.stdout or "[warn] ok" in run.stdout


def test_the_starter_uses_its_params_outputs_and_if(tmp_path: Path) -> None:
    assert opsrun("init", cwd=tmp_path).returncode == 0
    (tmp_path / "odd; touch pwned").mkdir()
    # Threshold -1: every disk is over it, so the `if:` holds and the warning step runs.
    run = opsrun("run", "disk-usage", "-p", "path=odd; touch pwned", "-p", "threshold=-1",
                 "--state-dir", str(tmp_path / "state"), cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "the disk holding odd; touch pwned is" in run.stdout
    assert "over -1% in use:" in run.stdout
    assert not (tmp_path / "pwned").exists()


def test_schema_line_points_at_the_written_schema(tmp_path: Path) -> None:
    assert opsrun("init", cwd=tmp_path).returncode == 0
    folder = tmp_path / "runbooks"
    first = (folder / "disk-usage.yaml").read_text().splitlines()[0]
    m = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first)
    assert m, first
    # yaml-language-server resolves a relative $schema against the runbook's own folder.
    written = folder / m.group(1)
    assert json.loads(written.read_text()) == json.loads(schema.text())


def test_inventory_example_has_the_inventory_format(tmp_path: Path, repo_root: Path) -> None:
    """hosts: {name: {hostname, port, user, key, groups}}, as runbooks/inventory.yaml."""
    assert opsrun("init", cwd=tmp_path).returncode == 0
    data = load_file(tmp_path / "runbooks" / "inventory.yaml").data
    assert set(data) == set(load_file(repo_root / "runbooks" / "inventory.yaml").data) == {"hosts"}
    groups = set()
    for name, host in data["hosts"].items():
        assert re.fullmatch(r"[a-z][a-z0-9-]*", name)
        assert "hostname" in host and set(host) <= {"hostname", "port", "user", "key", "groups"}
        groups.update(host.get("groups", []))
    # The starter's commented SSH step names a group the example defines.
    assert '"group:web"' in (tmp_path / "runbooks" / "disk-usage.yaml").read_text()
    assert "web" in groups


def test_commented_trigger_validates_when_uncommented(tmp_path: Path) -> None:
    assert opsrun("init", "rb", cwd=tmp_path).returncode == 0
    starter = tmp_path / "rb" / "disk-usage.yaml"
    text = starter.read_text()
    block = "# on:\n#   - schedule:\n#       cron: \"*/15 * * * *\"\n"
    assert block in text
    starter.write_text(text.replace(block, block.replace("# ", "").replace("#", "")))
    v = opsrun("validate", "rb", cwd=tmp_path)
    assert v.returncode == 0, v.stdout + v.stderr
    sources = opsrun("sources", "--runbooks", "rb", cwd=tmp_path)
    assert "*/15 * * * *" in sources.stdout, sources.stdout


def test_refuses_to_overwrite_and_writes_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "runbooks"
    folder.mkdir()
    (folder / "inventory.yaml").write_text("hosts: {mine: {hostname: 10.1.1.1}}\n")
    r = opsrun("init", cwd=tmp_path)
    assert r.returncode == 2
    assert no_traceback(r)
    assert "runbooks/inventory.yaml already exists" in r.stderr
    assert "never overwrites" in r.stderr
    assert (folder / "inventory.yaml").read_text() == "hosts: {mine: {hostname: 10.1.1.1}}\n"
    assert sorted(p.name for p in folder.iterdir()) == ["inventory.yaml"]


def test_second_init_refuses(tmp_path: Path) -> None:
    assert opsrun("init", cwd=tmp_path).returncode == 0
    before = {p: p.read_bytes() for p in (tmp_path / "runbooks").rglob("*") if p.is_file()}
    r = opsrun("init", cwd=tmp_path)
    assert r.returncode == 2
    assert "runbooks/disk-usage.yaml already exists" in r.stderr
    assert {p: p.read_bytes() for p in before} == before


def test_fills_an_existing_folder_beside_other_runbooks(tmp_path: Path, repo_root: Path) -> None:
    folder = tmp_path / "ops"
    folder.mkdir()
    (folder / "hello.yaml").write_bytes((repo_root / "runbooks" / "hello.yaml").read_bytes())
    r = opsrun("init", "ops", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "created ops/\n" not in r.stdout  # it was there already
    assert "opsrun run disk-usage --runbooks ops -p path=/var" in r.stdout
    v = opsrun("validate", "ops", cwd=tmp_path)
    assert v.returncode == 0 and "2 runbooks valid" in v.stdout, v.stdout


def test_nested_new_folder(tmp_path: Path) -> None:
    r = opsrun("init", "deep/er/runbooks", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "created deep/er/runbooks/\n" in r.stdout
    folder = tmp_path / "deep" / "er" / "runbooks"
    assert all((folder / name).is_file() for name in FILES)
    assert opsrun("validate", str(folder)).returncode == 0
    run = opsrun("run", "disk-usage", "--runbooks", str(folder), "--state-dir",
                 str(tmp_path / "state"))
    assert run.returncode == 0, run.stdout + run.stderr
    # The editor mapping it prints is relative to where it was run (the workspace root).
    assert '"deep/er/runbooks/.opsrun/runbook.schema.json": ["deep/er/runbooks/**/*.yaml"' \
        in r.stdout


def test_a_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "runbooks").write_text("not a folder\n")
    r = opsrun("init", cwd=tmp_path)
    assert r.returncode == 2
    assert "runbooks exists and is not a folder" in r.stderr
    assert no_traceback(r)
