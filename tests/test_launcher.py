"""The fast entry point answers exactly what the full command line would."""
from __future__ import annotations

from pathlib import Path

from tests.helpers.cli import opsrun

REGENERATE = "OPSRUN_FULL_CLI=1 python -m opsrun --help > opsrun/help.txt"


def test_help_matches_the_full_cli(repo_root: Path) -> None:
    fast = opsrun("--help")
    full = opsrun("--help", env={"OPSRUN_FULL_CLI": "1"})
    assert fast.returncode == full.returncode == 0
    assert fast.stdout == full.stdout, f"opsrun/help.txt is stale; regenerate it: {REGENERATE}"
    assert opsrun("-h").stdout == fast.stdout


def test_no_arguments_is_a_usage_error_with_help() -> None:
    fast = opsrun()
    full = opsrun(env={"OPSRUN_FULL_CLI": "1"})
    assert fast.returncode == full.returncode == 2
    assert fast.stdout + fast.stderr == full.stdout + full.stderr


def test_version_matches() -> None:
    assert opsrun("--version").stdout == opsrun("--version", env={"OPSRUN_FULL_CLI": "1"}).stdout


def test_everything_else_goes_to_the_cli() -> None:
    r = opsrun("validate", "--help")
    assert r.returncode == 0 and "Check runbooks" in r.stdout
