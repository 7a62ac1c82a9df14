"""Real journal files for the journal source's tests: entries in journald's export format
written by systemd-journal-remote, read back by the real journalctl --directory."""
from __future__ import annotations

import itertools
import shutil
import struct
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

_REMOTE_PLACES = ("/lib/systemd/systemd-journal-remote",
                  "/usr/lib/systemd/systemd-journal-remote")
_clock = itertools.count(int(time.time() * 1_000_000))


def journal_remote() -> str | None:
    """systemd-journal-remote, which lives outside PATH on Debian."""
    found = shutil.which("systemd-journal-remote")
    if found:
        return found
    return next((p for p in _REMOTE_PLACES if Path(p).is_file()), None)


def _why_not_runnable() -> str | None:
    if shutil.which("journalctl") is None:
        return "journalctl is not installed (it is part of systemd)"
    if journal_remote() is None:
        return ("systemd-journal-remote is not installed (apt-get install "
                "systemd-journal-remote)")
    return None


needs_journal = pytest.mark.skipif(_why_not_runnable() is not None,
                                   reason=_why_not_runnable() or "")

Entry = Mapping[str, "str | bytes | int"]


def export(entries: Sequence[Entry]) -> bytes:
    """Entries in the Journal Export Format: KEY=value lines, a blank line after each; a
    value that is bytes or holds a newline is written in the binary form (the name, a
    newline, its length as a little-endian 64-bit number, the bytes, a newline)."""
    out = bytearray()
    for entry in entries:
        fields = dict(entry)
        # Increasing times, as a real journal has; journal-remote takes them from here.
        fields.setdefault("__REALTIME_TIMESTAMP", next(_clock))
        for name, value in fields.items():
            data = value if isinstance(value, bytes) else str(value).encode()
            if isinstance(value, bytes) or b"\n" in data:
                out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
            else:
                out += name.encode() + b"=" + data + b"\n"
        out += b"\n"
    return bytes(out)


def write_entries(folder: Path, entries: Sequence[Entry], name: str = "remote.journal") -> None:
    """Append entries to the journal file `name` in `folder` (made if missing)."""
    remote = journal_remote()
    assert remote is not None
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([remote, f"--output={folder / name}", "-"], input=export(entries),
                          capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")


def entry(message: str | bytes, unit: str = "web.service", priority: int = 6,
          **fields: str | int) -> dict[str, str | bytes | int]:
    """An entry as a unit's process would log it."""
    return {"MESSAGE": message, "_SYSTEMD_UNIT": unit, "PRIORITY": priority,
            "SYSLOG_IDENTIFIER": unit.split(".")[0], "_HOSTNAME": "host-1", "_PID": 4242,
            **fields}
