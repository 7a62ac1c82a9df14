"""The only rich importer: tables and colour on a terminal, plain text elsewhere.

Colour is used only when stdout is a terminal and NO_COLOR is not set (no-color.org).
Every piece of untrusted text passes through `terminal_text.safe` before it is printed.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import IO, Any

from opsrun.terminal_text import safe

__all__ = ["safe", "use_color", "print_json", "print_table", "heading", "error_line"]


def use_color(stream: IO[str] | None = None) -> bool:
    """Whether to decorate output: a terminal, and neither NO_COLOR nor TERM=dumb."""
    stream = stream or sys.stdout
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return stream.isatty()


def print_json(data: Any) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *,
                title: str | None = None) -> None:
    """A table: rich on a colour terminal, aligned plain columns otherwise."""
    cells = [[safe(str(c), keep_newlines=False) for c in row] for row in rows]
    if use_color():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, show_edge=False, header_style="bold")
        for h in headers:
            table.add_column(h, overflow="fold")
        for row in cells:
            table.add_row(*row)
        Console(highlight=False).print(table)
        return
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    if title:
        print(title)
    print("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)).rstrip())
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def heading(text: str) -> str:
    """A section heading: bold on a colour terminal."""
    return f"\x1b[1m{text}\x1b[0m" if use_color() else text


def error_line(text: str) -> str:
    """An error line: red on a colour terminal."""
    return f"\x1b[31m{text}\x1b[0m" if use_color() else text
