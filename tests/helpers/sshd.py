"""A real OpenSSH server on 127.0.0.1 for the SSH tests (and bench/ssh.py).

`sshd` is started once per test session on a free port, with its own host key and one
authorized client key, both made in a temp folder; it lets the current user in with that
key only. It FAILS (never skips) when sshd is missing: the SSH steps are only tested
against a real server, and CI installs one (`.ci/run`: the Debian package openssh-server).
"""
from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.wait import wait_for

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd")


@dataclass
class Sshd:
    """A running sshd and what a client needs to reach it."""

    folder: Path
    port: int
    user: str
    client_key: Path  # private key the server accepts
    host_key_line: str  # the server's key as a known_hosts line: "[127.0.0.1]:PORT type b64"
    proc: subprocess.Popen[bytes]
    host: str = "127.0.0.1"

    @property
    def log(self) -> str:
        return (self.folder / "sshd.log").read_text(errors="replace")

    def inventory(self, names: list[str] | None = None, *, groups: tuple[str, ...] = ("test",),
                  extra: str = "") -> str:
        """An inventory whose hosts (default just `local`) are all this server."""
        lines = ["hosts:"]
        for name in names or ["local"]:
            lines.append(f"  {name}: {{hostname: {self.host}, port: {self.port}, "
                         f"user: {self.user}, key: {self.client_key}, "
                         f"groups: [{', '.join(groups)}]}}")
        return "\n".join(lines) + "\n" + extra

    def trust(self) -> Path:
        """Put the server's key in ~/.ssh/known_hosts (HOME is a temp folder in tests)."""
        known = Path.home() / ".ssh" / "known_hosts"
        known.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with known.open("a") as f:
            f.write(self.host_key_line + "\n")
        return known

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def find_sshd() -> str:
    """The absolute path of sshd (it re-executes itself, so it must be absolute)."""
    for path in (shutil.which("sshd"), *SSHD_CANDIDATES):
        if path and os.access(path, os.X_OK):
            return path
    pytest.fail("the SSH tests need OpenSSH's sshd, and it is not installed: install the "
                "package openssh-server (apt-get install openssh-server; .ci/run does)",
                pytrace=False)


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "opsrun-test",
                    "-f", str(path)], check=True, stdin=subprocess.DEVNULL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def start_sshd(folder: Path) -> Sshd:
    """Start sshd in FOLDER (keys, config, log) on a free port; wait until it answers."""
    sshd = find_sshd()
    if shutil.which("ssh-keygen") is None:
        pytest.fail("ssh-keygen is missing: install openssh-client", pytrace=False)
    folder.mkdir(parents=True, exist_ok=True)
    _keygen(folder / "host_key")
    _keygen(folder / "client_key")
    (folder / "authorized_keys").write_text((folder / "client_key.pub").read_text())
    if os.geteuid() == 0:
        # The privilege separation folder; the package creates it only when its service runs.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    user = getpass.getuser()
    port = _free_port()
    config = folder / "sshd_config"
    config.write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {folder}/host_key
PidFile {folder}/sshd.pid
AuthorizedKeysFile {folder}/authorized_keys
# The keys live in a temp folder whose parents sshd would find too open.
StrictModes no
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowUsers {user}
UseDNS no
PrintMotd no
PrintLastLog no
# Fan-out tests open 20 connections at once; the default (10:30:100) drops some of them.
MaxStartups 200
MaxSessions 50
LogLevel VERBOSE
""")
    log = open(folder / "sshd.log", "wb")
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    server = Sshd(folder, port, user, folder / "client_key",
                  _host_key_line(folder / "host_key.pub", port), proc)
    try:
        wait_for(lambda: proc.poll() is not None or _accepts(port), timeout=15,
                 message=lambda: f"sshd did not start:\n{server.log}")
    except BaseException:
        server.stop()
        raise
    if proc.poll() is not None:
        pytest.fail(f"sshd exited at start (code {proc.returncode}):\n{server.log}",
                    pytrace=False)
    return server


def _host_key_line(pub: Path, port: int) -> str:
    kind, b64 = pub.read_text().split()[:2]
    return f"[127.0.0.1]:{port} {kind} {b64}"


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """One sshd for the whole session, shared by every SSH test."""
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.stop()
