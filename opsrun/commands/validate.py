"""opsrun validate: check runbooks and report every problem with file:line:col."""
from __future__ import annotations

from pathlib import Path

from opsrun import output
from opsrun.errors import Problem
from opsrun.inventory import (
    INVENTORY_NAMES,
    InventoryInvalid,
    check_option,
    load_inventory,
)
from opsrun.notify.targets import NOTIFY_NAMES
from opsrun.runbook import load_runbooks


def main(paths: list[Path], *, as_json: bool = False, fmt: str = "text",
         inventory: Path | None = None) -> int:
    """Validate files and folders; exit 2 if anything is wrong.

    Host names of SSH steps are checked against `inventory`, else the inventory.yaml beside
    each runbook; an inventory given among the paths is checked as one.
    """
    check_option(inventory)
    runbooks, problems = load_runbooks(paths, inventory=inventory)
    if inventory is not None:  # checked even when no runbook uses it
        try:
            load_inventory(inventory)
        except InventoryInvalid as e:
            problems = [*problems, *(p for p in e.problems if p not in problems)]
    inventories = [p for p in paths if p.name in INVENTORY_NAMES and p.is_file()]
    notify_files = [p for p in paths if p.name in NOTIFY_NAMES and p.is_file()]
    warnings = [w for rb in runbooks for w in rb.warnings]
    if as_json:
        output.print_json({
            "version": 1,
            "ok": not problems,
            "runbooks": [{"name": rb.name, "file": str(rb.path), "sha256": rb.sha256}
                         for rb in runbooks],
            "problems": [_json(p) for p in problems],
            "warnings": [_json(w) for w in warnings],
        })
    elif fmt == "github":
        for p in [*problems, *warnings]:
            print(_github(p))
    else:
        for w in warnings:
            print(output.safe(str(w)))
        for p in problems:
            print(output.error_line(output.safe(str(p))))
        if problems:
            files = len({p.file for p in problems})
            print(f"{len(problems)} problem{'s' * (len(problems) != 1)} in {files} "
                  f"file{'s' * (files != 1)}; {len(runbooks)} runbook"
                  f"{'s' * (len(runbooks) != 1)} valid")
        elif not runbooks and inventories:
            print(f"{', '.join(str(p) for p in inventories)}: valid inventory")
        elif not runbooks and notify_files:
            print(f"{', '.join(str(p) for p in notify_files)}: valid notify file")
        elif not runbooks:
            print("no runbooks found in " + ", ".join(str(p) for p in paths))
        else:
            print(f"{len(runbooks)} runbook{'s' * (len(runbooks) != 1)} valid")
    return 2 if problems else 0


def _json(p: Problem) -> dict[str, object]:
    return {"file": p.file, "line": p.line, "col": p.col, "message": p.message}


def _github(p: Problem) -> str:
    """A GitHub Actions workflow command that annotates the line in a pull request."""
    def esc(text: str, prop: bool = False) -> str:
        text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
        return text.replace(":", "%3A").replace(",", "%2C") if prop else text

    loc = f"file={esc(p.file, True)}"
    if p.line:
        loc += f",line={p.line},col={p.col}"
    return output.safe(f"::{p.severity} {loc}::{esc(p.message)}")
