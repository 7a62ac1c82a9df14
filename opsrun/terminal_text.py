"""Make untrusted text safe to print: no escape sequence from a log line rewrites the terminal."""
from __future__ import annotations

import re

# C0 controls except tab and newline, DEL, and C1 controls (0x80-0x9f: CSI and friends).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _escape(m: re.Match[str]) -> str:
    return f"\\x{ord(m.group()):02x}"


def safe(text: str, *, keep_newlines: bool = True) -> str:
    """Replace control characters (ESC, BEL, CR, …) with visible `\\x1b`-style escapes."""
    out = _CONTROL.sub(_escape, text)
    if not keep_newlines:
        out = out.replace("\n", "\\n").replace("\t", "\\t")
    return out
