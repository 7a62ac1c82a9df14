"""The command line: declares commands and options, and hands plain values to opsrun.commands.

Nothing else happens here. Each command module is imported only when its command runs, so
that `opsrun --help` stays fast.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Optional

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
