"""The only module that starts processes."""
from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path


def capture(argv: Sequence[str], *, cwd: Path | None = None,
            timeout_s: float = 10.0) -> tuple[int, str, str]:
    """Run a short helper command to completion; return (returncode, stdout, stderr).

    A command that cannot be started or does not end in time reports returncode 127 / 124
    instead of raising, since callers treat helper output as optional information.
    """
    try:
        done = subprocess.run(list(argv), cwd=cwd, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout_s, check=False)
    except FileNotFoundError as e:
        return 127, "", str(e)
    except subprocess.TimeoutExpired:
        return 124, "", f"{argv[0]} did not finish within {timeout_s:g}s"
    return (done.returncode, done.stdout.decode("utf-8", "replace"),
            done.stderr.decode("utf-8", "replace"))
