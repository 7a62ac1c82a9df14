"""Make untrusted text safe to print: no escape sequence from a log line rewrites the terminal.

What is escaped: C0 controls except tab and newline (ESC, BEL, CR, backspace…), DEL, the C1
controls (0x80-0x9f: a lone 0x9b is CSI on some terminals), the bidirectional controls
that make text display in another order than it is written ("Trojan Source", CVE-2021-42574),
and the Unicode line and paragraph separators. Each becomes a visible `\\x1b` or `\\u202e`.
"""
from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e"
                      r"\u2066-\u2069\u2028\u2029]")


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(text: str, *, keep_newlines: bool = True) -> str:
    """Replace control characters (ESC, BEL, CR, …) with visible `\\x1b`-style escapes."""
    out = _CONTROL.sub(_escape, text)
    if not keep_newlines:
        out = out.replace("\n", "\\n").replace("\t", "\\t")
    return out
