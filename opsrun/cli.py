"""The command line: declares commands and options, and hands plain values to opsrun.commands.

Nothing else happens here. Each command module is imported only when its command runs, so
that `opsrun --help` stays fast.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from opsrun import __version__, error_handler

app = typer.Typer(
    name="opsrun",
    help="Operations runbooks that fire on events: run one now, or watch and run on events.",
    rich_markup_mode=None,
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"opsrun {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", envvar="OPSRUN_DEBUG",
                               help="Show tracebacks for errors."),
) -> None:
    ctx.obj = {"debug": debug}


def _finish(ctx: typer.Context, fn: Callable[[], int]) -> None:
    """Run a command function through the one error handler and exit with its code."""
    debug = bool(ctx.obj and ctx.obj.get("debug"))
    raise typer.Exit(error_handler.call(fn, debug=debug))


_RUNBOOKS_HELP = "Runbooks folder (default ./runbooks)."


def _runbooks_opt() -> Any:
    return typer.Option(None, "--runbooks", "-r", envvar="OPSRUN_RUNBOOKS",
                        help=_RUNBOOKS_HELP, show_envvar=True)


# ── runbooks: validate, list, show, schema ──────────────────────────────────

@app.command("validate")
def _validate(
    ctx: typer.Context,
    paths: Optional[list[Path]] = typer.Argument(
        None, help="Runbook files or folders (default: the runbooks folder)."),
    runbooks: Optional[Path] = _runbooks_opt(),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    fmt: str = typer.Option("text", "--format", help="text, or github for GitHub Actions "
                                                     "annotations."),
) -> None:
    """Check runbooks and report every problem as file:line:col."""
    from opsrun import paths as paths_mod
    from opsrun.commands import validate

    if fmt not in ("text", "github"):
        raise typer.BadParameter("use text or github", param_hint="--format")
    targets = list(paths or [paths_mod.runbooks_dir_from_env(runbooks)])
    _finish(ctx, lambda: validate.main(targets, as_json=as_json, fmt=fmt))


@app.command("list")
def _list(
    ctx: typer.Context,
    runbooks: Optional[Path] = _runbooks_opt(),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List the runbooks: name, triggers, number of steps, file."""
    from opsrun import paths as paths_mod
    from opsrun.commands import listing

    folder = paths_mod.runbooks_dir_from_env(runbooks)
    _finish(ctx, lambda: listing.main(folder, as_json=as_json))


@app.command("show")
def _show(
    ctx: typer.Context,
    runbook: str = typer.Argument(..., help="Runbook name or file path."),
    runbooks: Optional[Path] = _runbooks_opt(),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show a runbook as a readable plan: triggers, params, steps and their conditions."""
    from opsrun import paths as paths_mod
    from opsrun.commands import show

    folder = paths_mod.runbooks_dir_from_env(runbooks)
    _finish(ctx, lambda: show.main(runbook, folder, as_json=as_json))


@app.command("schema")
def _schema(ctx: typer.Context) -> None:
    """Print the JSON Schema of the runbook format (for editors)."""
    from opsrun.commands import schema

    _finish(ctx, schema.main)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the `opsrun` console script."""
    try:
        app(args=argv, prog_name="opsrun")
    except SystemExit as e:
        code = e.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    return 0
