"""Step outputs written to $OPSRUN_OUTPUT, the `$GITHUB_OUTPUT` convention.

    name=value              one line
    name<<DELIMITER         several lines, up to a line that is exactly DELIMITER
    line one
    DELIMITER
"""
from __future__ import annotations

import re

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
MAX_OUTPUT_FILE_BYTES = 1024 * 1024


def parse(text: str) -> tuple[dict[str, str], list[str]]:
    """Outputs and warnings (one per line that could not be read)."""
    outputs: dict[str, str] = {}
    warnings: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip():
            continue
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, _, delimiter = line.partition("<<")
            body: list[str] = []
            while i < len(lines) and lines[i] != delimiter:
                body.append(lines[i])
                i += 1
            if i >= len(lines):
                warnings.append(f"output {name!r}: no closing {delimiter!r} line")
            i += 1
            value = "\n".join(body)
        else:
            name, sep, value = line.partition("=")
            if not sep:
                warnings.append(f"ignored output line {line[:60]!r}: expected name=value")
                continue
        name = name.strip()
        if not _NAME.match(name):
            warnings.append(f"ignored output {name[:60]!r}: names are letters, digits, _ and -")
            continue
        outputs[name] = value
    return outputs, warnings
