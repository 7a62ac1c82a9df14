"""Small file helpers the tests share: writing runbooks, reading the audit log."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any


def write(folder: Path, name: str, text: str) -> Path:
    """Write `text`, dedented, to `folder/name` (folders made as needed); return the path."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def audit(state: Path) -> list[dict[str, Any]]:
    """Every record of the audit log in a state folder (none if there is no log yet)."""
    log = state / "audit.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
