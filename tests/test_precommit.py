"""The pre-commit hook, run for real the way another repository runs it.

pre-commit clones the hook repository at a commit and pip-installs it into a fresh
virtualenv, so this needs the package index for opsrun's dependencies (as CI has). The
consumer repositories name a committed copy of the project in their .pre-commit-config.yaml
and share one PRE_COMMIT_HOME, so that install happens once per test session.
`pre-commit try-repo` would do the same with a throw-away store, that is one install (about
15 s) per call: it is what a hook author types by hand, the config is what users write.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.tree import GIT_ENV, copy_project, git

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

GOOD = """\
name: good
steps:
  - run: echo fine
"""

BAD = """\
name: bad
steps:
  - run: echo fine
    retyr: 3
"""

# What pre-commit would otherwise try to read as runbooks if the hook checked every YAML.
NOT_RUNBOOKS = {
    "runbooks/inventory.yaml": "hosts:\n  web-1: {hostname: 192.0.2.11, groups: [web]}\n",
    ".github/workflows/ci.yml": "on: push\njobs: {}\n",
    "deploy/compose.yaml": "services:\n  web: {image: nginx}\n",
}


@pytest.fixture(scope="session")
def hook_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A committed copy of the project as it is now: what try-repo clones."""
    return copy_project(tmp_path_factory.mktemp("opsrun-hook-repo"), commit=True)


@pytest.fixture(scope="session")
def pre_commit_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pre-commit-home")


def pre_commit() -> list[str]:
    exe = Path(sys.executable).with_name("pre-commit")
    if not exe.exists():
        pytest.fail("pre-commit is not installed; it is in the test extras: "
                    "pip install -e '.[test]'")
    return [str(exe)]


def run_hook(consumer: Path, home: Path) -> subprocess.CompletedProcess[str]:
    """`pre-commit run --all-files` in CONSUMER, the way CI or a commit runs it."""
    env = {**os.environ, **GIT_ENV, "PRE_COMMIT_HOME": str(home), "PRE_COMMIT_COLOR": "never"}
    return subprocess.run([*pre_commit(), "run", "--all-files"], cwd=consumer, env=env,
                          capture_output=True, text=True, timeout=840, check=False)


def consumer_repo(root: Path, hook_repo: Path, files: dict[str, str]) -> Path:
    """A git repository with FILES staged and a config that uses opsrun's hook."""
    rev = git("rev-parse", "HEAD", cwd=hook_repo).strip()
    files = {".pre-commit-config.yaml": (f"repos:\n  - repo: {hook_repo}\n    rev: {rev}\n"
                                         "    hooks:\n      - id: opsrun-validate\n"),
             **files}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    git("init", "-q", "-b", "main", cwd=root)
    git("add", "-A", cwd=root)
    return root


def test_hook_fails_on_a_bad_runbook(tmp_path: Path, hook_repo: Path,
                                     pre_commit_home: Path) -> None:
    repo = consumer_repo(tmp_path, hook_repo, {"runbooks/good.yaml": GOOD,
                                               "runbooks/bad.yaml": BAD, **NOT_RUNBOOKS})
    r = run_hook(repo, pre_commit_home)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert re.search(r"^runbooks/bad\.yaml:4:5: error: steps\[0\]\.retyr: unknown key 'retyr'",
                     out, re.M), out
    assert "Failed" in out
    # Only runbooks were given to opsrun: no complaint about the other YAML files.
    for name in NOT_RUNBOOKS:
        assert name not in out, out
    assert "runbooks/good.yaml" not in out


def test_hook_passes_on_good_runbooks(tmp_path: Path, hook_repo: Path,
                                      pre_commit_home: Path) -> None:
    repo = consumer_repo(tmp_path, hook_repo, {
        "runbooks/good.yaml": GOOD, "runbooks/ops/other.yml": GOOD.replace("good", "other"),
        **NOT_RUNBOOKS})
    r = run_hook(repo, pre_commit_home)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert re.search(r"^opsrun validate\.+Passed$", out, re.M), out


def test_hook_catches_a_name_used_twice(tmp_path: Path, hook_repo: Path,
                                        pre_commit_home: Path) -> None:
    repo = consumer_repo(tmp_path, hook_repo, {"runbooks/a.yaml": GOOD,
                                               "runbooks/b.yaml": GOOD})
    r = run_hook(repo, pre_commit_home)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "the runbook name 'good' is already used by runbooks/a.yaml" in out
