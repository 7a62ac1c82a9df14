"""Turn every way a command can end into one clear message and an exit code."""
from __future__ import annotations

import errno
import sys
from collections.abc import Callable

from opsrun import exit_codes
from opsrun.errors import OpsrunError
from opsrun.terminal_text import safe


def call(fn: Callable[[], int], *, debug: bool = False) -> int:
    """Run a command function; expected errors become one line on stderr and their exit code."""
    try:
        return fn()
    except OpsrunError as e:
        if debug:
            _print_traceback()
        # Messages quote what was given (paths, values, runbook text): shown, never obeyed.
        text = safe(str(e))
        print(f"opsrun: {text}" if "\n" not in text else text, file=sys.stderr)
        return int(e.exit_code)
    except KeyboardInterrupt:
        print("opsrun: interrupted", file=sys.stderr)
        return int(exit_codes.INTERRUPTED)
    except BrokenPipeError:
        # `opsrun audit show | head` closes the pipe early; that is not an error.
        _silence_stdout()
        return int(exit_codes.OK)
    except Exception as e:  # noqa: BLE001 - the last line of defence
        if debug:
            _print_traceback()
        limit = _ENVIRONMENT.get(getattr(e, "errno", None) or 0) if isinstance(e, OSError) \
            else ("out of memory" if isinstance(e, MemoryError) else None)
        if limit is not None:
            # Not a bug: something ran out, or this user may not; say which.
            print(f"opsrun: {safe(str(e))}: {limit}", file=sys.stderr)
            return int(exit_codes.RUN_FAILED)
        print(f"opsrun: internal error: {type(e).__name__}: {safe(str(e))}\n"
              "This is a bug in opsrun; run again with --debug for the traceback and report it.",
              file=sys.stderr)
        return 70  # EX_SOFTWARE


_ENVIRONMENT = {
    errno.EMFILE: "this process's limit on open files is reached; raise it with ulimit -n "
                  "(LimitNOFILE= in a systemd unit)",
    errno.ENFILE: "the system's limit on open files is reached (fs.file-max)",
    errno.ENOSPC: "the disk (or the kernel's inotify watch limit) is full; free some space",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.ENOMEM: "out of memory",
    errno.EACCES: "this user may not use it; run opsrun as its owner, or ask the owner to "
                  "share the state folder with your group",
    errno.EPERM: "this user may not use it; run opsrun as its owner",
    errno.EROFS: "the file system is read-only",
}


def _print_traceback() -> None:
    import traceback

    traceback.print_exc()


def _silence_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
