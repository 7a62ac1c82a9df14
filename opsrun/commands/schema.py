"""opsrun schema: print the JSON Schema of the runbook format."""
from __future__ import annotations

import json

from opsrun.schema import json_schema


def main() -> int:
    print(json.dumps(json_schema(), indent=2, ensure_ascii=False))
    return 0
