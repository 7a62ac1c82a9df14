"""Where opsrun keeps its files: the state folder (DESIGN section 7) and the runbooks folder."""
from __future__ import annotations

import os
import stat
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
    _check_trusted(path)
    if not os.access(path, os.W_OK | os.X_OK):
        if _read_only_mount(path):
            raise StateError(f"the state folder {path} is on a read-only file system; "
                             "remount it read-write or choose another with --state-dir")
        raise StateError(f"the state folder {path} is not writable by this user; "
                         "fix its permissions or choose another with --state-dir")
    return path


def check_trusted(path: Path) -> None:
    """Refuse a state folder someone else could have planted links in (see _check_trusted);
    for commands that only read it, when it exists."""
    if path.is_dir():
        _check_trusted(path)


def _check_trusted(path: Path) -> None:
    """Refuse a state folder that someone else could swap files in (as sshd's StrictModes).

    Whoever may write in the folder, or in a folder above it, can put a symlink where the
    audit log or state.db goes, and opsrun (root, often) would write through it. So the
    folder and every folder above it must belong to this user or root, the folder itself
    may not be writable by its group or others, and no folder above it by everyone unless
    it is sticky like /tmp.
    """
    me = os.geteuid()
    link = os.lstat(path)
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in (me, 0):
        _untrusted(path, f"is a symbolic link made by {_owner(link.st_uid)}",
                   "remove the link, or choose another folder with --state-dir")
    real = Path(os.path.realpath(path))
    for folder in (real, *real.parents):
        st = os.stat(folder)
        where = "is" if folder == real else f"is inside {folder}, which is"
        if st.st_uid not in (me, 0):
            user = _owner(st.st_uid)
            _untrusted(path, f"{where} owned by {user}", f"run opsrun as {user} "
                       f"(sudo -u {user} opsrun …), or choose another folder with --state-dir")
        if folder == real and st.st_mode & 0o022:
            _untrusted(path, f"can be written by its group or others (mode "
                       f"{stat.S_IMODE(st.st_mode):04o})", f"run `chmod go-w {path}`")
        if st.st_mode & 0o002 and not st.st_mode & stat.S_ISVTX:
            _untrusted(path, f"is inside {folder}, which everyone may write to",
                       f"run `chmod o-w {folder}`, or choose another folder with --state-dir")


def _untrusted(path: Path, why: str, fix: str) -> None:
    raise StateError(f"the state folder {path} {why}: another user could swap the audit "
                     f"log or the state store for a link to elsewhere, so opsrun will not use "
                     f"it; {fix}")


def _owner(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


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
