"""opsrun list: the runbooks in a folder, one line each."""
from __future__ import annotations

import sys
from pathlib import Path

from opsrun import describe, output
from opsrun.runbook import load_runbooks


def main(folder: Path, *, as_json: bool = False) -> int:
    """Print a table of the runbooks; invalid files are reported on stderr."""
    runbooks, problems = load_runbooks([folder])
    if as_json:
        output.print_json({"version": 1, "runbooks": [{
            "name": rb.name, "file": str(rb.path), "description": rb.description,
            "triggers": [describe.trigger_short(t) for t in rb.triggers],
            "steps": len(rb.steps), "sha256": rb.sha256,
        } for rb in runbooks], "invalid": sorted({p.file for p in problems})})
    else:
        rows = [(rb.name, describe.runbook_triggers_short(rb), str(len(rb.steps)), str(rb.path))
                for rb in runbooks]
        if rows:
            output.print_table(["name", "triggers", "steps", "file"], rows)
        else:
            print(f"no valid runbooks in {folder}")
    if problems:
        files = sorted({p.file for p in problems})
        print(f"opsrun: {len(files)} file(s) did not validate and are not listed: "
              f"{', '.join(files)}; run `opsrun validate {folder}`", file=sys.stderr)
        return 2
    return 0
