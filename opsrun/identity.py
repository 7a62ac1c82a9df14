"""Who is acting: taken from the operating system, never from a flag."""
from __future__ import annotations

import grp
import os
import pwd
from typing import NamedTuple


class Identity(NamedTuple):
    """A user as the kernel knows them; `sudo_user` is who ran sudo, when that happened."""

    user: str
    uid: int
    groups: tuple[str, ...] = ()
    sudo_user: str | None = None

    def as_record(self) -> dict[str, object]:
        out: dict[str, object] = {"user": self.user, "uid": self.uid}
        if self.sudo_user:
            out["sudo_user"] = self.sudo_user
        return out


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def for_uid(uid: int, gid: int | None = None) -> Identity:
    """The identity of a uid, with the names of all its groups."""
    name = user_name(uid)
    if gid is None:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = -1
    groups: set[str] = set()
    try:
        for g in os.getgrouplist(name, gid):
            try:
                groups.add(grp.getgrgid(g).gr_name)
            except KeyError:
                groups.add(str(g))
    except (KeyError, OSError):
        pass
    return Identity(name, uid, tuple(sorted(groups)))


def current() -> Identity:
    """The user this process runs as (the real uid), and the sudo caller if any."""
    me = for_uid(os.getuid(), os.getgid())
    sudo = os.environ.get("SUDO_USER") if os.getuid() == 0 else None
    return Identity(me.user, me.uid, me.groups, sudo)
