"""opsrun init: create a runbooks folder a newcomer can start from.

It writes three files into DIR (default ./runbooks), and nothing anywhere else:

- `disk-usage.yaml`, a commented starter runbook that validates and runs as it is, and shows
  params, outputs and an `if:`;
- `inventory.yaml`, an example of the hosts SSH steps reach (opsrun never reads it as a
  runbook);
- `.opsrun/runbook.schema.json`, the JSON Schema of the format. The starter's first line,
  `# yaml-language-server: $schema=.opsrun/runbook.schema.json`, points at it relative to
  the runbook, which is the one form every yaml-language-server client resolves from any
  folder (the installed package's path differs on every machine, and a URL needs a network).
  The folder starts with a dot, so `opsrun validate` and `opsrun watch` skip it.

The editor settings hint (a `yaml.schemas` mapping for files without that first line) is
printed rather than written: a `.vscode/settings.json` inside DIR is read only when DIR
itself is opened as the workspace, and the project's own settings file is not ours to edit.
Its paths are relative to the current folder, taken to be the workspace root; the
`!…/inventory.yaml` pattern that keeps the inventory out needs a yaml-language-server
recent enough to know negated patterns (older ones ignore it and flag the inventory).

Nothing is overwritten: if any of the files exists, nothing is written at all and the exit
code is 2.
"""
from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from opsrun.errors import UsageError

SCHEMA_FILE = ".opsrun/runbook.schema.json"
STARTER_FILE = "disk-usage.yaml"
INVENTORY_FILE = "inventory.yaml"

STARTER = """\
# yaml-language-server: $schema=.opsrun/runbook.schema.json
#
# A first runbook: it measures how full a disk is, and warns above a threshold.
# `opsrun validate` checks it; `opsrun run` runs it; `opsrun show` prints it as a plan.
# The first line lets your editor check and complete this file as you type (the schema is
# in .opsrun/; refresh it after an upgrade with `opsrun schema > .opsrun/runbook.schema.json`).
name: disk-usage
description: Report how full the disk holding a path is, and warn above a threshold.

# Without `on:` a runbook runs only when someone starts it. Uncomment these lines and
# `opsrun watch` also runs it every 15 minutes (`opsrun sources` shows the next times).
# on:
#   - schedule:
#       cron: "*/15 * * * *"

# Typed params, given with -p name=value. A value always reaches the shell as one quoted
# word, never as shell syntax: -p path='x; rm -rf ~' checks a folder of that odd name.
params:
  path: {type: string, default: /, description: A file or folder on the disk to check}
  threshold: {type: int, default: 90, description: Warn above this percentage in use}

steps:
  - id: measure
    name: Measure disk use
    # A step sets outputs by writing name=value lines to the file $OPSRUN_OUTPUT;
    # later steps read them as steps.measure.outputs.percent.
    run: |
      used=$(df -P ${{ params.path }} | awk 'NR == 2 { sub("%", "", $5); print $5 }')
      echo "the disk holding ${{ params.path }} is ${used}% full"
      echo "percent=$used" >> "$OPSRUN_OUTPUT"

  - id: warn
    name: Warn when it is too full
    # `if:` takes a bare expression (no ${{ }}); when it is false the step is skipped.
    if: steps.measure.outputs.percent | int > params.threshold
    run: |
      echo "over ${{ params.threshold }}% in use:"
      df -h ${{ params.path }}

  # Next, a step that waits for a person to say yes (at the terminal, or with
  # `opsrun approve RUN_ID` from anywhere), then a step over SSH to the hosts of
  # inventory.yaml:
  #
  # - id: approve
  #   confirm: "Clean up the old logs on the web hosts?"
  #
  # - id: clean
  #   hosts: ["group:web"]
  #   run: find /var/log/app -name '*.gz' -mtime +14 -delete
"""

INVENTORY = """\
# The hosts that SSH steps reach. opsrun reads this file from the runbooks folder;
# it is not a runbook, so `opsrun validate` and `opsrun watch` leave it alone.
#
# A step names hosts and groups from here:
#   host: web-1                      one host
#   hosts: [web-1, "group:web"]      several, `parallel: N` at a time
#
# Only `hostname` is required. `user`, `port` and `key` default to what ~/.ssh/config
# says for that hostname, then to your user name, 22 and your usual keys.
# Host keys must already be known (ssh to each host once, so that it is in
# ~/.ssh/known_hosts); opsrun refuses unknown keys unless you pass --accept-new-hosts.
#
# The addresses below are documentation examples (RFC 5737): replace them with yours.
hosts:
  web-1:
    hostname: 192.0.2.11
    user: deploy
    groups: [web]
  web-2:
    hostname: 192.0.2.12
    user: deploy
    groups: [web]
  db-1:
    hostname: db-1.example.internal
    port: 2222
    user: deploy
    key: ~/.ssh/id_ed25519_deploy
    groups: [db]
"""


@dataclass(frozen=True)
class Planned:
    """One file `opsrun init` writes: where (relative to DIR), what, and why (shown)."""

    name: str
    text: str
    what: str


def plan() -> list[Planned]:
    """The files of a new runbooks folder, in the order they are reported."""
    from opsrun.commands import schema

    return [
        Planned(STARTER_FILE, STARTER, "a first runbook: params, outputs and an `if:`"),
        Planned(INVENTORY_FILE, INVENTORY, "example hosts for SSH steps; edit it"),
        Planned(SCHEMA_FILE, schema.text(), "the schema your editor checks runbooks with"),
    ]


def main(folder: Path) -> int:
    """Create FOLDER (and its parents) with the starter files; refuse to overwrite any."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} exists and is not a folder; give `opsrun init` a new "
                         "folder or an existing one")
    files = plan()
    # Check everything before writing anything, so a refusal leaves no half-made folder.
    for f in files:
        target = folder / f.name
        if target.exists() or target.is_symlink():
            raise UsageError(f"{target} already exists; opsrun init never overwrites a file. "
                             "Move it away, or give another folder: opsrun init DIR")
    created_root = not folder.exists()
    try:
        for f in files:
            target = folder / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            # "x": fail rather than overwrite a file that appeared since the check above.
            with open(target, "x", encoding="utf-8") as out:
                out.write(f.text)
    except FileExistsError as e:
        raise UsageError(f"{e.filename} already exists; opsrun init never overwrites a "
                         "file") from None
    except OSError as e:
        raise UsageError(f"cannot create {e.filename or folder}: {e.strerror}; choose a "
                         "folder you can write to: opsrun init DIR") from None
    _report(folder, files, created_root)
    return 0


def _report(folder: Path, files: list[Planned], created_root: bool) -> None:
    q = shlex.quote
    shown = str(folder)
    if created_root:
        print(f"created {shown}/")
    width = max(len(str(folder / f.name)) for f in files)
    for f in files:
        print(f"created {str(folder / f.name):<{width}}  {f.what}")

    starter = q(str(folder / STARTER_FILE))
    # By name only when the folder is the one every command looks in by default.
    by_name = "opsrun run disk-usage" if folder == Path("runbooks") else \
        f"opsrun run disk-usage --runbooks {q(shown)}"
    steps = [(f"opsrun validate {q(shown)}", "check every runbook in the folder"),
             (f"opsrun run {starter}", "run the starter now"),
             (f"{by_name} -p path=/var -p threshold=50", "run it with other params"),
             (f"opsrun show {starter}", "the runbook as a readable plan")]
    width = max(len(cmd) for cmd, _ in steps)
    print("\nNext:")
    for cmd, why in steps:
        print(f"  {cmd:<{width}}  # {why}")

    where = _workspace_path(folder)
    mapping = json.dumps({_workspace_path(folder / SCHEMA_FILE): [
        f"{where}/**/*.yaml", f"{where}/**/*.yml", f"!{where}/**/{INVENTORY_FILE}"]})
    print(f"\nEditor: the first line of {STARTER_FILE} gives completion and checks as you "
          "type\nin editors that use yaml-language-server (VS Code's YAML extension, Neovim, "
          "Helix, …);\nstart new runbooks with it. Or map the schema to the folder in "
          f".vscode/settings.json:\n  \"yaml.schemas\": {mapping}")


def _workspace_path(path: Path) -> str:
    """PATH as `yaml.schemas` wants it: relative to the current folder, taken to be the
    workspace root, when it lies inside it; else absolute."""
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return absolute.as_posix()
