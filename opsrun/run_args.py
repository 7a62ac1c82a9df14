"""`opsrun run …` read without building the typer app: the command people time.

Only a command line made of `run`'s own options in their plain forms (`-p X`, `--param X`,
`--param=X`, flags) is taken here; anything else — help, a typo, an unknown option, a
missing value, a second argument, `--`, OPSRUN_DEBUG — goes to the full command line in
cli.py, which parses it with click and says what is wrong. tests/test_launcher.py checks
that these options are `run`'s own, name for name, and that both paths run alike.
"""
from __future__ import annotations

import os

VALUE_OPTIONS = {"--param": "param", "-p": "param", "--event": "event",
                 "--runbooks": "runbooks", "-r": "runbooks", "--state-dir": "state_dir",
                 "--audit-log": "audit_log", "--secrets-file": "secrets_file",
                 "--inventory": "inventory"}
FLAGS = {"--dry-run": "dry_run", "--yes": "yes", "-y": "yes", "--json": "as_json",
         "--accept-new-hosts": "accept_new_hosts"}
ENVVARS = {"runbooks": "OPSRUN_RUNBOOKS", "state_dir": "OPSRUN_STATE_DIR",
           "audit_log": "OPSRUN_AUDIT_LOG", "secrets_file": "OPSRUN_SECRETS_FILE"}


class RunArgs:
    """What `opsrun run` was given, as cli.py's `run` would pass it on."""

    def __init__(self, runbook: str, param: list[str], values: dict[str, str],
                 flags: set[str]) -> None:
        self.runbook = runbook
        self.param = param
        self.values = values  # the single-value options given
        self.flags = flags

    def value(self, name: str) -> str | None:
        """An option's value: given, else from its environment variable (empty = unset)."""
        given = self.values.get(name)
        if given is not None:
            return given
        var = ENVVARS.get(name)
        return (os.environ.get(var) or None) if var else None


def parse(args: list[str]) -> RunArgs | None:
    """`run RUNBOOK [options]` understood, or None: let click parse it."""
    if not args or args[0] != "run" or os.environ.get("OPSRUN_DEBUG") is not None:
        return None
    runbook: str | None = None
    param: list[str] = []
    values: dict[str, str] = {}
    flags: set[str] = set()
    rest = args[1:]
    while rest:
        arg = rest.pop(0)
        name, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if arg in FLAGS:
            flags.add(FLAGS[arg])
        elif name in VALUE_OPTIONS and (eq or rest):
            value = inline if eq else rest.pop(0)
            if not eq and value.startswith("-") and value != "-":
                return None  # click's business: it may mean an option
            if VALUE_OPTIONS[name] == "param":
                param.append(value)
            else:
                values[VALUE_OPTIONS[name]] = value
        elif arg.startswith("-") or runbook is not None:
            return None  # help, an unknown option, `--`, an extra argument, …
        else:
            runbook = arg
    if runbook is None:
        return None
    return RunArgs(runbook, param, values, flags)


def main(parsed: RunArgs) -> int:
    """Run it as cli.py's `run` does: through the one error handler."""
    from pathlib import Path

    from opsrun import error_handler, paths
    from opsrun.commands import run

    inventory = parsed.value("inventory")
    return error_handler.call(lambda: run.main(
        parsed.runbook, paths.runbooks_dir_from_env(parsed.value("runbooks")),
        param_args=parsed.param, event_arg=parsed.value("event"),
        dry_run="dry_run" in parsed.flags, yes="yes" in parsed.flags,
        as_json="as_json" in parsed.flags, state_dir=parsed.value("state_dir"),
        audit_log=parsed.value("audit_log"), secrets_file=parsed.value("secrets_file"),
        inventory=Path(inventory) if inventory else None,
        accept_new_hosts="accept_new_hosts" in parsed.flags))
