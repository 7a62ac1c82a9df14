"""A second OS user for the tests of who may do what (CI runs as root and creates it)."""
from __future__ import annotations

import fcntl
import grp
import os
import pwd
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

GROUP = "opsrun-test"
USER = "opsrun-test-bob"


@dataclass(frozen=True)
class OtherUser:
    name: str
    uid: int
    gid: int


def other_user() -> OtherUser:
    """Create (once) a user outside root's groups, in the group GROUP."""
    if os.geteuid() != 0:
        pytest.skip("creating a second user needs root (CI runs the tests as root)")
    # Test workers run side by side: whoever comes second finds the lock of /etc/passwd
    # taken or the user made, so the outcome that counts is the user existing afterwards.
    lock = open("/run/opsrun-test-user.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            grp.getgrnam(GROUP)
        except KeyError:
            subprocess.run(["groupadd", "-f", GROUP], check=True)
        try:
            pw = pwd.getpwnam(USER)
        except KeyError:
            subprocess.run(["useradd", "-M", "-N", "-g", GROUP, "-s", "/bin/sh", USER],
                           check=True)
            pw = pwd.getpwnam(USER)
    finally:
        lock.close()
    return OtherUser(USER, pw.pw_uid, pw.pw_gid)


def share_with_group(folder: Path) -> None:
    """Let members of GROUP reach the state folder (and so the sockets in it)."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chown(folder, -1, grp.getgrnam(GROUP).gr_gid)
    folder.chmod(0o750)


def run_as(user: OtherUser, fn: Callable[[], int]) -> tuple[int, str]:
    """Run `fn` in a forked child with the user's uid and gid; return (exit code, output).

    A fork rather than `runuser opsrun …`: the interpreter may live under /root, which the
    other user cannot execute, while a forked child already has it loaded. The kernel
    credentials, which are what opsrun checks, are the same either way.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 70
        try:
            os.close(r)
            os.dup2(w, 1)
            os.dup2(w, 2)
            import sys

            # pytest replaces sys.stdout with its own capture; write to the real fds.
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            os.setgroups([user.gid])
            os.setgid(user.gid)
            os.setuid(user.uid)
            os.environ["HOME"] = "/"
            os.environ["USER"] = user.name
            code = fn()
        except BaseException as e:  # noqa: BLE001 - the child must always exit
            os.write(2, f"child failed: {e!r}\n".encode())
        finally:
            import sys

            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(w)
    chunks = []
    while True:
        data = os.read(r, 65536)
        if not data:
            break
        chunks.append(data)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")
