"""Where opsrun keeps its files: the state folder (DESIGN section 7) and the runbooks folder."""
from __future__ import annotations

import os
from pathlib import Path

from opsrun.errors import StateError

STATE_DB = "state.db"
AUDIT_LOG = "audit.jsonl"
CONTROL_SOCKET = "control.sock"
DEFAULT_RUNBOOKS = "runbooks"


def state_dir_from_env(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the state folder: --state-dir, OPSRUN_STATE_DIR, $STATE_DIRECTORY, XDG."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("OPSRUN_STATE_DIR"):
        return Path(os.environ["OPSRUN_STATE_DIR"]).expanduser()
    if os.environ.get("STATE_DIRECTORY"):
        # systemd may pass several folders separated by ':'; the first is ours.
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "opsrun"


def ensure_state_dir(path: Path) -> Path:
    """Create the state folder with mode 0700 if needed, and check it can be written."""
    if path.exists() and not path.is_dir():
        # Checked first: mkdir would only say "File exists", which does not say what is wrong.
        raise StateError(f"the state folder {path} is a file, not a folder; "
                         "choose another with --state-dir or OPSRUN_STATE_DIR")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise StateError(f"cannot create the state folder {path}: {e.strerror}; "
                         "choose another with --state-dir or OPSRUN_STATE_DIR") from e
    if not path.is_dir():
        raise StateError(f"the state folder {path} is not a folder; "
                         "choose another with --state-dir or OPSRUN_STATE_DIR")
    if not os.access(path, os.W_OK | os.X_OK):
        if _read_only_mount(path):
            raise StateError(f"the state folder {path} is on a read-only file system; "
                             "remount it read-write or choose another with --state-dir")
        raise StateError(f"the state folder {path} is not writable by this user; "
                         "fix its permissions or choose another with --state-dir")
    return path


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def runbooks_dir_from_env(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the runbooks folder: --runbooks, OPSRUN_RUNBOOKS, else ./runbooks."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("OPSRUN_RUNBOOKS"):
        return Path(os.environ["OPSRUN_RUNBOOKS"]).expanduser()
    return Path(DEFAULT_RUNBOOKS)
