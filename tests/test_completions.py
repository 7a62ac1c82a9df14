"""The shipped completion scripts are generated from the CLI and must not go stale."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers.cli import opsrun


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_are_current(repo_root: Path, shell: str) -> None:
    r = opsrun("completion", shell)
    assert r.returncode == 0
    shipped = (repo_root / "completions" / f"opsrun.{shell}").read_text()
    assert shipped == r.stdout, (
        f"completions/opsrun.{shell} is stale; regenerate all three with: "
        "for s in bash zsh fish; do opsrun completion $s > completions/opsrun.$s; done")


def test_bash_completion_completes_commands_and_runbooks(repo_root: Path) -> None:
    script = repo_root / "completions" / "opsrun.bash"
    probe = (f'source {script}; '
             'COMP_WORDS=(opsrun va); COMP_CWORD=1; _opsrun; echo "${COMPREPLY[@]}"; '
             'COMP_WORDS=(opsrun show he); COMP_CWORD=2; _opsrun; echo "${COMPREPLY[@]}"')
    out = subprocess.run(["bash", "-c", probe], cwd=repo_root, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ["validate", "hello"]


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_scripts_parse(repo_root: Path, shell: str) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed (.ci/run installs it)")
    subprocess.run([shell, "-n", str(repo_root / "completions" / f"opsrun.{shell}")], check=True)


def test_unknown_shell() -> None:
    r = opsrun("completion", "tcsh")
    assert r.returncode == 2
    assert "choose bash, zsh or fish" in r.stderr
