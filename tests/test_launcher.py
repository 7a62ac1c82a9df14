"""The fast entry point answers exactly what the full command line would."""
from __future__ import annotations

from pathlib import Path

import pytest

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


# ── `opsrun run` without the typer app (opsrun/run_args.py) ────────────────

def test_the_fast_run_knows_exactly_runs_options() -> None:
    """Every option of `run` in cli.py, and nothing else, is one run_args reads, the same
    way (a value, or a flag), with the same environment variable."""
    import typer

    from opsrun import cli, run_args

    command = typer.main.get_command(cli.app).commands["run"]  # type: ignore[attr-defined]
    declared = {}
    for p in command.params:
        if p.param_type_name == "option":
            for flag in p.opts:
                declared[flag] = ("flag" if p.is_flag else "value", p.envvar)
    fast = {**{f: "value" for f in run_args.VALUE_OPTIONS},
            **{f: "flag" for f in run_args.FLAGS}}
    assert {f: kind for f, (kind, _) in declared.items()} == fast
    envvars = {run_args.VALUE_OPTIONS[f]: env for f, (_, env) in declared.items() if env}
    assert envvars == run_args.ENVVARS


def _both(args: list[str], env: dict[str, str]) -> tuple[object, object]:
    fast = opsrun(*args, env=env)
    full = opsrun(*args, env={**env, "OPSRUN_FULL_CLI": "1"})
    return fast, full


def _shown(r: object) -> tuple[int, str]:
    import re

    text = r.stdout + r.stderr  # type: ignore[attr-defined]
    text = re.sub(r"\b[0-9A-HJKMNP-TV-Z]{26}\b", "<run>", text)
    text = re.sub(r"\d+(\.\d+)?(ms|s)\b", "<t>", text)
    return r.returncode, text  # type: ignore[attr-defined]


@pytest.mark.parametrize("args", [
    ["run", "{rb}", "-p", "name=Ada", "--param=shout=true", "--event", '{"x": 1}'],
    ["run", "{rb}", "--dry-run", "--json", "-p", "name=x; rm -rf ~"],
    ["run", "{rb}", "-p", "nme=Ada"],  # a usage error the command reports
    ["run", "{rb}", "--colour"],  # click's own: the fast path lets it answer
    ["run"],
    ["run", "{rb}", "-h"],
    ["run", "{rb}", "extra"],
    ["--debug", "run", "{rb}", "-p", "nme=1"],
])
def test_the_fast_run_answers_as_the_full_cli(repo_root: Path, tmp_path: Path,
                                              args: list[str]) -> None:
    rb = str(repo_root / "runbooks" / "hello.yaml")
    env = {"OPSRUN_STATE_DIR": str(tmp_path / "state")}
    fast, full = _both([a.replace("{rb}", rb) for a in args], env)
    assert _shown(fast) == _shown(full)
