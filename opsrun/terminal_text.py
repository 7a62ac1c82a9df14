"""Make untrusted text safe to print: no escape sequence from a log line rewrites the terminal.

What is escaped: every control character (C0 except tab and newline, DEL, C1: a lone 0x9b
is CSI on some terminals), every format character — among them the bidirectional controls
that make text display in another order than it is written ("Trojan Source",
CVE-2021-42574) and the invisible ones (zero-width space, soft hyphen, BOM, tags) — the
Unicode line and paragraph separators, and lone surrogates: the Unicode categories Cc, Cf,
Zl, Zp and Cs. Each becomes a visible `\\x1b` or `\\u202e`. The class below lists those
categories as of Unicode 14 (Python 3.11); tests/test_hostile.py checks it against the
running Python's unicodedata.
"""
from __future__ import annotations

import re
from functools import lru_cache

# ASCII text needs no regex (compiling the one below is a good part of a short run's start).
_ASCII = {c: f"\\x{c:02x}" for c in (*range(0x00, 0x09), *range(0x0b, 0x20), 0x7f)}


@lru_cache(maxsize=1)
def _control() -> re.Pattern[str]:
    return re.compile(
        "[\x00-\x08\x0b-\x1f\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891"
        "\u08e2\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ud800-\udfff"
        "\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U00013438\U0001bca0-\U0001bca3"
        "\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]")


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def safe(text: str, *, keep_newlines: bool = True) -> str:
    """Replace control and format characters (ESC, BEL, CR, U+202E, …) with visible escapes.

    Tab and newline stay unless `keep_newlines` is False: then they are shown as `\\t`, `\\n`.
    """
    out = text.translate(_ASCII) if text.isascii() else _control().sub(_escape, text)
    if not keep_newlines:
        out = out.replace("\n", "\\n").replace("\t", "\\t")
    return out
