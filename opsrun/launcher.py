"""The `opsrun` entry point: answers `--help`, `--version` and a plain `opsrun run` without
loading the CLI.

Building the full command line (typer, click, every command's options) costs more than
everything else `opsrun --help` does. The top-level help is therefore kept, generated,
in `help.txt` (tests/test_launcher.py fails when it is stale and says how to regenerate
it); `opsrun run` with its own options goes straight to the command (run_args.py); any
other command line goes to `opsrun.cli`.
"""
from __future__ import annotations

import os
import sys

# os.path, not pathlib: importing pathlib alone costs a third of this fast path.
HELP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "help.txt")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `opsrun` console script."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not os.environ.get("OPSRUN_FULL_CLI"):
        if args in (["--help"], ["-h"], []) and os.path.exists(HELP):
            with open(HELP, encoding="utf-8") as f:
                sys.stdout.write(f.read())
            return 0 if args else 2  # like click: no command at all is a usage error
        if args == ["--version"]:
            from opsrun import __version__

            print(f"opsrun {__version__}")
            return 0
        if args[:1] == ["run"]:
            from opsrun import run_args

            parsed = run_args.parse(args)
            if parsed is not None:
                return run_args.main(parsed)
    from opsrun.cli import main as cli_main

    return cli_main(args)
