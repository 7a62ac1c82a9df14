"""opsrun schema: print the JSON Schema of the runbook format."""
from __future__ import annotations

import json

from opsrun.runbook_schema import json_schema


def text() -> str:
    """The schema as published in opsrun/schema/runbook.schema.json."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    print(text(), end="")
    return 0
