"""The hosts SSH steps reach: `inventory.yaml` beside the runbooks, and `~/.ssh/config`.

    hosts:
      web-1: {hostname: 192.0.2.11, port: 22, user: deploy, key: ~/.ssh/id_deploy, groups: [web]}

Only `hostname` is required. A step names hosts (`web-1`) and groups (`group:web`, every
host whose `groups` lists `web`, in the inventory's order). A name that is not in the
inventory is still accepted when a `Host` line of `~/.ssh/config` matches it (a bare `*`
does not count): its HostName, Port, User and IdentityFile are read when it is connected to.
Passwords are refused: opsrun logs in with keys only.

Which inventory a runbook uses: `--inventory FILE` when given, else the nearest
`inventory.yaml` (or `.yml`) in the runbook's folder or a parent of it up to the runbooks
folder. This module reads files but never connects anywhere; the SSH executor does that.
"""
from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from opsrun.errors import Problem, UsageError
from opsrun.schema_checks import (
    INVALID,
    Field,
    Integer,
    ListOf,
    MapOf,
    Object,
    Problems,
    Text,
)
from opsrun.suggest import did_you_mean
from opsrun.yaml_load import YamlError, load_bytes, read_limited

_EMPTY_MAP: Mapping[str, Any] = MappingProxyType({})

INVENTORY_NAMES = ("inventory.yaml", "inventory.yml")
GROUP_PREFIX = "group:"
HOST_NAME_RE = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
SSH_CONFIG = "~/.ssh/config"

_NO_PASSWORD = ("is refused: opsrun never keeps passwords in an inventory (anyone who "
                "reads the runbooks would read it) and logs in with keys only; set "
                "`key: ~/.ssh/id_ed25519` to a key file, or load the key into the SSH agent")
PASSWORD_KEYS = ("password", "passphrase", "pass", "passwd", "ssh_password", "ssh_pass",
                 "ansible_password", "ansible_ssh_pass", "ansible_become_password",
                 "sudo_password", "become_password")

HOST = Object("a host", {
    "hostname": Field(Text(pattern=r"[^\s]+", hint="a host name or address has no spaces",
                           description="Address or DNS name to connect to"),
                      required=True),
    "port": Field(Integer(minimum=1, maximum=65535,
                          description="SSH port (default: ~/.ssh/config, else 22)")),
    "user": Field(Text(pattern=r"[^\s@:]+", hint="a user name has no spaces, @ or :",
                       description="User to log in as (default: ~/.ssh/config, else yours)")),
    "key": Field(Text(description="Private key file (default: ~/.ssh/config, the SSH "
                                  "agent and your usual keys)")),
    "groups": Field(ListOf(Text(pattern=HOST_NAME_RE, hint="a group name is letters, "
                                "digits, _, - and ., starting with a letter or digit"),
                           single_ok=True, description="Groups this host belongs to "
                                                       "(hosts: [\"group:NAME\"])"),
                    default=[]),
}, description="One host SSH steps can reach",
    synonyms={"host": "hostname", "address": "hostname", "ip": "hostname",
              "ansible_host": "hostname", "username": "user", "ansible_user": "user",
              "ansible_port": "port", "identityfile": "key", "identity_file": "key",
              "key_file": "key", "keyfile": "key", "ssh_key": "key", "private_key": "key",
              "ansible_ssh_private_key_file": "key", "group": "groups"},
    refused={k: f"`{k}` {_NO_PASSWORD}" for k in PASSWORD_KEYS})

INVENTORY = Object("the inventory", {
    "hosts": Field(MapOf(HOST, key_pattern=HOST_NAME_RE,
                         key_hint="a host name is letters, digits, _, - and ., starting "
                                  "with a letter or digit"),
                   default={}),
}, description="The hosts SSH steps reach")


class Host(NamedTuple):
    """One host a step reaches. `hostname` None: a name taken from ~/.ssh/config."""

    name: str
    hostname: str | None = None
    port: int | None = None
    user: str | None = None
    key: str | None = None
    groups: tuple[str, ...] = ()


class Inventory(NamedTuple):
    """The hosts of one inventory file (or none: `path` None), plus ~/.ssh/config names."""

    path: Path | None
    hosts: Mapping[str, Host] = _EMPTY_MAP
    config: Path | None = None  # ~/.ssh/config when not given

    @property
    def ssh_config(self) -> Path:
        """The ssh_config file whose Host names count as known: ~/.ssh/config by default."""
        return self.config or Path(os.path.expanduser(SSH_CONFIG))

    @property
    def groups(self) -> dict[str, list[str]]:
        """Group name → its hosts, in the inventory's order."""
        out: dict[str, list[str]] = {}
        for h in self.hosts.values():
            for g in h.groups:
                out.setdefault(g, []).append(h.name)
        return out

    def problem_with(self, name: str) -> str | None:
        """Why a name in `hosts:` cannot be used, or None when it can."""
        where = str(self.path) if self.path else "no inventory"
        if name.startswith(GROUP_PREFIX):
            group = name[len(GROUP_PREFIX):]
            groups = self.groups
            if group in groups:
                return None
            if self.path is None:
                return (f"unknown group {group!r}: there is no inventory.yaml beside the "
                        "runbook (give one with --inventory FILE); a group is made of the "
                        "hosts that list it in their `groups:`")
            known = (f"the groups of {where} are {', '.join(sorted(groups))}" if groups
                     else f"no host of {where} lists a group in its `groups:`")
            return f"unknown group {group!r}{did_you_mean(group, groups)}; {known}"
        if name in self.hosts or ssh_config_knows(self.ssh_config, name):
            return None
        hint = did_you_mean(name, self.hosts)
        if self.path is None:
            return (f"unknown host {name!r}: there is no inventory.yaml beside the runbook "
                    f"(give one with --inventory FILE) and no `Host` line of "
                    f"{_tilde(self.ssh_config)} matches it")
        return (f"unknown host {name!r}{hint}: it is not in {where} and no `Host` line of "
                f"{_tilde(self.ssh_config)} matches it; add it to the inventory")

    def expand(self, names: Iterable[str]) -> tuple[Host, ...]:
        """The hosts that names and `group:NAME`s stand for, each once, in order."""
        out: dict[str, Host] = {}
        groups = self.groups
        for name in names:
            if name.startswith(GROUP_PREFIX):
                members = groups.get(name[len(GROUP_PREFIX):], [])
            else:
                members = [name]
            for m in members:
                out.setdefault(m, self.hosts.get(m) or Host(m))
        return tuple(out.values())


class InventoryInvalid(Exception):
    """An inventory file that does not load; carries every problem, with file:line:col."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def _tilde(path: Path) -> str:
    home = os.path.expanduser("~")
    text = str(path)
    return "~" + text[len(home):] if text.startswith(home + "/") else text


def load_inventory(path: Path) -> Inventory:
    """Read and check an inventory file; raise InventoryInvalid with every problem."""
    try:
        doc = load_bytes(read_limited(path))
    except YamlError as e:
        raise InventoryInvalid([Problem(str(path), e.line, e.col, e.message)]) from None
    except OSError as e:
        raise InventoryInvalid([Problem(str(path), 1, 1,
                                        f"cannot read the inventory: {e.strerror}")]) from None
    if doc.data is None:
        return Inventory(path)
    problems = Problems()
    if not isinstance(doc.data, Mapping):
        problems.add((), "the inventory must be a mapping with `hosts:`, like "
                         "`hosts: {web-1: {hostname: 192.0.2.11}}`")
        data = INVALID
    elif "hosts" not in doc.data and all(isinstance(v, Mapping) for v in doc.data.values()) \
            and doc.data:
        problems.add((), "the inventory lists its hosts under `hosts:`; indent them below "
                         "a first line `hosts:`")
        data = INVALID
    else:
        data = INVENTORY.check(doc.data, (), problems)
    if problems or data is INVALID:
        raise InventoryInvalid(problems.located(doc, path))
    hosts = {name: Host(name, h["hostname"], h["port"], h["user"], h["key"],
                        tuple(dict.fromkeys(h["groups"])))
             for name, h in data["hosts"].items()}
    return Inventory(path, hosts)


def check_option(inventory: Path | None) -> None:
    """--inventory must name a file that exists (its content is checked with the runbooks)."""
    if inventory is not None and not inventory.is_file():
        what = "is a folder" if inventory.is_dir() else "does not exist"
        raise UsageError(f"--inventory {inventory}: the file {what}; give the inventory "
                         "file (like runbooks/inventory.yaml), or leave --inventory out to use "
                         "the inventory.yaml beside the runbooks")


def find_inventory(runbook: Path, root: Path | None = None) -> Path | None:
    """The nearest inventory file in the runbook's folder or its parents up to `root`."""
    folder = Path(os.path.abspath(runbook)).parent
    stop = Path(os.path.abspath(root)) if root is not None else folder
    if stop != folder and stop not in folder.parents:
        stop = folder
    while True:
        for name in INVENTORY_NAMES:
            if (folder / name).is_file():
                # Named as the runbook was (relative stays relative), for messages.
                return folder / name if runbook.is_absolute() else \
                    Path(os.path.relpath(folder / name))
        if folder == stop or folder.parent == folder:
            return None
        folder = folder.parent


class Inventories:
    """The inventory of each runbook, each file read once: explicit, or found beside it."""

    def __init__(self, explicit: Path | None = None, root: Path | None = None) -> None:
        self.explicit = explicit
        self.root = root
        self._loaded: dict[Path | None, Inventory | InventoryInvalid] = {}
        self.reported: set[Path] = set()  # files whose problems were already reported

    def for_runbook(self, runbook: Path) -> Inventory | InventoryInvalid:
        """The runbook's inventory, or the error its file gives."""
        path = self.explicit if self.explicit is not None else find_inventory(runbook, self.root)
        if path not in self._loaded:
            if path is None:
                self._loaded[path] = Inventory(None)
            else:
                try:
                    self._loaded[path] = load_inventory(path)
                except InventoryInvalid as e:
                    self._loaded[path] = e
        return self._loaded[path]


# ── ~/.ssh/config names (for validation; the executor reads the file with paramiko) ──

_HOST_LINE = re.compile(r"^\s*host(?:\s*=\s*|\s+)(.+?)\s*$", re.IGNORECASE)
_ssh_config_cache: dict[tuple[str, float, int], tuple[list[str], list[str]]] = {}


def _ssh_config_patterns(path: Path) -> tuple[list[str], list[str]]:
    """The positive and negated patterns of the file's `Host` lines."""
    try:
        st = path.stat()
    except OSError:
        return [], []
    key = (str(path), st.st_mtime, st.st_size)
    if key not in _ssh_config_cache:
        positive: list[str] = []
        negative: list[str] = []
        try:
            text = path.read_text("utf-8", "replace")
        except OSError:
            return [], []
        for line in text.splitlines():
            m = _HOST_LINE.match(line)
            if not m:
                continue
            for word in m.group(1).split():
                word = word.strip('"')
                if word.startswith("!"):
                    negative.append(word[1:])
                elif word != "*":
                    positive.append(word)
        _ssh_config_cache.clear()
        _ssh_config_cache[key] = (positive, negative)
    return _ssh_config_cache[key]


def ssh_config_knows(path: Path, name: str) -> bool:
    """Whether a `Host` line of the SSH client config names `name` (a bare `*` does not)."""
    positive, negative = _ssh_config_patterns(path)
    if any(fnmatch.fnmatchcase(name, p) for p in negative):
        return False
    return any(fnmatch.fnmatchcase(name, p) for p in positive)
