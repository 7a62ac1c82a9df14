"""SSH steps: the only paramiko importer (loaded on the first connection, not before).

A step with `host:`/`hosts:` runs its command on each host, `parallel` at a time. Per run,
each host gets one connection, reused by every step of the run and closed when it ends.

Host keys are checked against `~/.ssh/known_hosts` and the state folder's `known_hosts`;
an unknown key fails the host unless `--accept-new-hosts` (then it is stored in the state
folder's file and reported to `on_learned`, for the audit log), a changed key always fails.
Log-in is with keys only: the inventory's `key:` (or IdentityFile of ~/.ssh/config), the
SSH agent, and the usual ~/.ssh/id_* files.

What the remote side runs. The exec request is a fixed loader, `sh -c 'eval "$(cat)"'`,
and the step is written to its stdin, which is then closed: `export NAME='value'` lines
for the step's environment (shell-quoted; servers refuse most `env` requests, and stdin
keeps the values out of the remote process list), `cd` to the workdir, and
`bash -c SCRIPT` (the step's `shell:`). `$OPSRUN_HOST` is the host's inventory name.
`$OPSRUN_OUTPUT` names a fresh private file in the remote `$TMPDIR` (or /tmp); when the
command has ended, the loader prints that file between two markers made of a random token
(so no output can fake them) and removes it: the outputs come back on the same channel,
without a second round trip, and the markers and what is between them are never shown as
output. `$OPSRUN_EVENT_FILE` names a local file, so it is not given to remote commands
(the event is in `$OPSRUN_EVENT` and `$OPSRUN_EVENT_<FIELD>`).

Stopping. At a timeout or a cancel, the command's process group gets SIGTERM, then SIGKILL
after the grace period, from `kill` on a second channel: the command writes its process
group to a private file when it starts (sshd makes each session a process group of its
own). The SSH "signal" request would be the protocol's way, but OpenSSH refuses it for
root log-ins, and a pty would merge stderr into stdout and make commands think a person
is watching. Whether the command ended is checked: the server reports its end; if it never
does, the host's error says the command may still be running there.
"""
from __future__ import annotations

import base64
import getpass
import hashlib
import os
import re
import secrets
import select
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opsrun import run_types as rt
from opsrun import step_outputs
from opsrun.executors.base import ExecRequest, ExecResult, OutputFn
from opsrun.inventory import Host

KNOWN_HOSTS = "known_hosts"  # opsrun's own file, in the state folder
CONNECT_TIMEOUT_S = 10.0
KEEPALIVE_S = 15
READ_SIZE = 32 * 1024
REMOTE_LOADER = "sh -c 'eval \"$(cat)\"'"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LOCAL_ONLY_ENV = frozenset({"OPSRUN_EVENT_FILE"})
_POLL_S = 0.05

# Host outcomes are step outcomes.
SUCCESS, FAILURE, TIMED_OUT, CANCELLED = rt.SUCCESS, rt.FAILURE, rt.STEP_TIMED_OUT, \
    rt.STEP_CANCELLED

LearnedFn = Callable[[str, dict[str, Any]], None]  # (run_id, what was learned)


def _paramiko() -> Any:
    import logging

    import paramiko

    # paramiko logs each failed connection with a traceback; with no handler anywhere,
    # Python would print it on stderr. opsrun reports the failure itself, once, clearly.
    logger = logging.getLogger("paramiko")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    return paramiko


def _home_file(*parts: str) -> Path:
    return Path(os.path.expanduser("~")).joinpath(*parts)


@dataclass(frozen=True)
class SshOptions:
    """How SSH steps connect; the defaults are OpenSSH's files of the user running opsrun."""

    state_dir: Path
    accept_new_hosts: bool = False
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    keepalive_s: int = KEEPALIVE_S
    grace_s: float = 5.0
    user_known_hosts: Path = field(default_factory=lambda: _home_file(".ssh", "known_hosts"))
    ssh_config: Path = field(default_factory=lambda: _home_file(".ssh", "config"))

    @property
    def known_hosts(self) -> Path:
        """opsrun's own known_hosts file, where --accept-new-hosts stores keys."""
        return self.state_dir / KNOWN_HOSTS


class HostFailed(Exception):
    """A host could not be reached, trusted or logged in to; the message says what to do."""


class _UnknownHostKey(Exception):
    def __init__(self, key: Any) -> None:
        super().__init__("unknown host key")
        self.key = key


@dataclass(frozen=True)
class Target:
    """Where a host is reached, once the inventory and ~/.ssh/config have had their say."""

    name: str
    hostname: str
    port: int
    user: str
    key_files: tuple[str, ...]
    connect_timeout_s: float

    @property
    def address(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"

    @property
    def known_hosts_name(self) -> str:
        """How OpenSSH names the host in known_hosts."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"


def fingerprint(key: Any) -> str:
    """OpenSSH's form: SHA256: and the unpadded base64 of the key's digest."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


@dataclass
class _Connection:
    client: Any  # paramiko.SSHClient
    target: Target
    key_type: str
    fingerprint: str
    host_key: str  # known | learned

    def alive(self) -> bool:
        transport = self.client.get_transport()
        return transport is not None and transport.is_active()

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001 - closing a broken connection may fail again
            pass


@dataclass
class _HostRun:
    """What happened on one host."""

    name: str
    outcome: str = FAILURE
    exit_code: int | None = None
    error: str | None = None
    address: str | None = None
    key_type: str | None = None
    fingerprint: str | None = None
    host_key: str | None = None
    duration: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return {"address": self.address, "key_type": self.key_type,
                "fingerprint": self.fingerprint, "host_key": self.host_key,
                "exit_code": self.exit_code, "outcome": self.outcome, "error": self.error,
                "duration": round(self.duration, 3), "outputs": self.outputs}


class SshExecutor:
    """Runs `run:` steps that name hosts; one instance serves every run of an engine."""

    def __init__(self, options: SshOptions, on_learned: LearnedFn | None = None) -> None:
        self.options = options
        self.on_learned = on_learned
        self._conns: dict[tuple[str, str], _Connection] = {}
        self._lock = threading.Lock()
        self._learn_lock = threading.Lock()
        self._config: tuple[tuple[float, int] | None, Any] | None = None

    # ── the step ────────────────────────────────────────────────────────────

    def execute(self, request: ExecRequest, on_output: OutputFn,
                cancel: threading.Event) -> ExecResult:
        """Run the step on each of its hosts, at most `parallel` at once; wait for all."""
        from concurrent.futures import ThreadPoolExecutor

        hosts = request.step.targets or tuple(Host(n) for n in request.step.hosts)
        deadline = None if request.timeout_s is None else time.monotonic() + request.timeout_s
        sockets: dict[str, socket.socket] = {}  # connecting now, closed at a cancel
        width = max(1, min(request.step.parallel, len(hosts)))
        with ThreadPoolExecutor(max_workers=width, thread_name_prefix="opsrun-ssh") as pool:
            futures = [pool.submit(self._on_host, request, h, on_output, cancel, deadline,
                                   sockets) for h in hosts]
            while not all(f.done() for f in futures):
                if cancel.wait(_POLL_S):
                    for s in list(sockets.values()):
                        _close_quietly(s)
            runs = [f.result() for f in futures]
        return _combine(runs, cancel)

    def end_run(self, run_id: str) -> None:
        """Close the run's connections."""
        with self._lock:
            mine = [k for k in self._conns if k[0] == run_id]
            conns = [self._conns.pop(k) for k in mine]
        for c in conns:
            c.close()

    def _on_host(self, request: ExecRequest, host: Host, on_output: OutputFn,
                 cancel: threading.Event, deadline: float | None,
                 sockets: dict[str, socket.socket]) -> _HostRun:
        run = _HostRun(host.name)
        t0 = time.monotonic()
        try:
            if cancel.is_set():
                run.outcome, run.error = CANCELLED, "not started: the run was cancelled"
                return run
            conn = self._connection(request.run_id, host, cancel, deadline, sockets)
            run.address, run.key_type = conn.target.address, conn.key_type
            run.fingerprint, run.host_key = conn.fingerprint, conn.host_key
            self._run_command(conn, request, on_output, cancel, deadline, run)
        except HostFailed as e:
            run.error = str(e)
            if cancel.is_set():
                run.outcome = CANCELLED
            elif deadline is not None and time.monotonic() >= deadline:
                run.outcome = TIMED_OUT
        except Exception as e:  # noqa: BLE001 - one host's surprise must not sink the others
            run.error = f"SSH to {host.name} failed: {type(e).__name__}: {e}"
        finally:
            run.duration = time.monotonic() - t0
        return run

    # ── connections ─────────────────────────────────────────────────────────

    def _connection(self, run_id: str, host: Host, cancel: threading.Event,
                    deadline: float | None, sockets: dict[str, socket.socket]) -> _Connection:
        key = (run_id, host.name)
        with self._lock:
            conn = self._conns.get(key)
        if conn is not None and conn.alive():
            return conn
        if conn is not None:
            conn.close()
        conn = self._connect(run_id, self.target(host), cancel, deadline, sockets)
        with self._lock:
            self._conns[key] = conn
        return conn

    def target(self, host: Host) -> Target:
        """Hostname, port, user and keys of a host: the inventory first, then ~/.ssh/config."""
        cfg = self._ssh_config().lookup(host.hostname or host.name)
        key_files: tuple[str, ...]
        if host.key:
            path = os.path.expanduser(host.key)
            if not os.path.isfile(path):
                raise HostFailed(f"{host.name}: the key file {host.key} named in the "
                                 "inventory does not exist; fix `key:` or remove it to use "
                                 "the SSH agent and your usual keys")
            key_files = (path,)
        else:
            key_files = tuple(p for p in (os.path.expanduser(k)
                                          for k in cfg.get("identityfile", []))
                              if os.path.isfile(p))
        try:
            port = host.port or int(cfg.get("port", 22))
            timeout = float(cfg["connecttimeout"]) if "connecttimeout" in cfg \
                else self.options.connect_timeout_s
        except ValueError as e:
            raise HostFailed(f"{host.name}: {self.options.ssh_config} has a bad value: "
                             f"{e}") from None
        return Target(host.name, host.hostname or cfg.get("hostname", host.name), port,
                      host.user or cfg.get("user") or getpass.getuser(), key_files, timeout)

    def _ssh_config(self) -> Any:
        """~/.ssh/config, read again when it changes."""
        paramiko = _paramiko()
        path = self.options.ssh_config
        try:
            st = path.stat()
            stamp: tuple[float, int] | None = (st.st_mtime, st.st_size)
        except OSError:
            stamp = None
        if self._config is None or self._config[0] != stamp:
            config = paramiko.SSHConfig()
            if stamp is not None:
                try:
                    config = paramiko.SSHConfig.from_path(str(path))
                except (OSError, paramiko.ConfigParseError) as e:
                    raise HostFailed(f"cannot read {path}: {e}") from None
            self._config = (stamp, config)
        return self._config[1]

    def _connect(self, run_id: str, t: Target, cancel: threading.Event,
                 deadline: float | None, sockets: dict[str, socket.socket]) -> _Connection:
        paramiko = _paramiko()
        timeout = t.connect_timeout_s
        if deadline is not None:
            timeout = max(0.001, min(timeout, deadline - time.monotonic()))
        sock = _open_socket(t, timeout)
        sockets[t.name] = sock
        client = paramiko.SSHClient()
        policy = _Policy(self, run_id, t)
        try:
            self._load_known_hosts(client)
            client.set_missing_host_key_policy(policy)
            client.connect(t.hostname, t.port, username=t.user,
                           key_filename=list(t.key_files) or None, timeout=timeout,
                           allow_agent=True, look_for_keys=True, sock=sock,
                           banner_timeout=timeout, auth_timeout=timeout)
        except BaseException as e:
            client.close()
            _close_quietly(sock)
            if cancel.is_set():
                raise HostFailed(f"{t.name}: connecting to {t.address} was cancelled") from None
            raise self._explain(e, t, timeout) from None
        finally:
            sockets.pop(t.name, None)
        transport = client.get_transport()
        transport.set_keepalive(self.options.keepalive_s)
        key = transport.get_remote_server_key()
        return _Connection(client, t, key.get_name(), fingerprint(key),
                           "learned" if policy.learned else "known")

    def _load_known_hosts(self, client: Any) -> None:
        for path in (self.options.user_known_hosts, self.options.known_hosts):
            if path.is_file():
                try:
                    client.load_system_host_keys(str(path))
                except (OSError, UnicodeDecodeError) as e:
                    raise HostFailed(f"cannot read the known hosts file {path}: {e}") from None

    def _explain(self, e: BaseException, t: Target, timeout: float) -> BaseException:
        """The error of a failed connection, as a person can act on it."""
        paramiko = _paramiko()
        if isinstance(e, HostFailed):
            return e
        if isinstance(e, _UnknownHostKey):
            return HostFailed(self._unknown_key_message(t, e.key))
        if isinstance(e, paramiko.BadHostKeyException):
            return HostFailed(self._changed_key_message(t, e.key, e.expected_key))
        if isinstance(e, paramiko.AuthenticationException):
            tried = ", ".join([*t.key_files, "the SSH agent", "~/.ssh/id_*"])
            return HostFailed(f"{t.name}: {t.address} refused the log-in as {t.user!r} "
                              f"(tried {tried}); add your public key to that user's "
                              "~/.ssh/authorized_keys on the host, or name the right key or "
                              "user in the inventory (opsrun never uses passwords)")
        if isinstance(e, (socket.timeout, TimeoutError)):
            return HostFailed(f"{t.name}: {t.address} did not complete the SSH handshake "
                              f"within {timeout:g}s")
        if isinstance(e, (paramiko.SSHException, EOFError, OSError)):
            return HostFailed(f"{t.name}: SSH to {t.address} failed: {e or type(e).__name__}")
        if isinstance(e, Exception):
            return HostFailed(f"{t.name}: SSH to {t.address} failed: {type(e).__name__}: {e}")
        return e  # KeyboardInterrupt and the like go on up

    def _unknown_key_message(self, t: Target, key: Any) -> str:
        port = f" -p {t.port}" if t.port != 22 else ""
        return (f"{t.name}: the host key of {t.hostname}:{t.port} is not known "
                f"({key.get_name()} {fingerprint(key)}); check that fingerprint with the "
                f"host's owner, then either ssh{port} {t.user}@{t.hostname} once and "
                f"accept it, or add it with ssh-keyscan{port} {t.hostname} >> "
                "~/.ssh/known_hosts, or run again with --accept-new-hosts (opsrun keeps "
                f"it in {self.options.known_hosts})")

    def _changed_key_message(self, t: Target, got: Any, expected: Any) -> str:
        name = t.known_hosts_name
        files = [p for p in (self.options.user_known_hosts, self.options.known_hosts)
                 if _has_entry(p, name)]
        removes = " and ".join(f"ssh-keygen -R {shlex.quote(name)} -f {shlex.quote(str(p))}"
                               for p in files) or f"ssh-keygen -R {shlex.quote(name)}"
        return (f"{t.name}: the host key of {t.hostname}:{t.port} has CHANGED: it is now "
                f"{got.get_name()} {fingerprint(got)}, and {expected.get_name()} "
                f"{fingerprint(expected)} is the one known. This may be an attack (someone "
                "between you and the host), or the host was reinstalled: ask its owner. "
                f"Only if the new key is right, remove the old one with {removes}, then "
                "connect again (--accept-new-hosts never replaces a known key)")

    def learn(self, run_id: str, t: Target, key: Any) -> None:
        """Report a new host key (the audit log), then keep it in the state folder's file.

        In that order: a key the audit log could not record is not trusted next time.
        """
        path = self.options.known_hosts
        line = f"{t.known_hosts_name} {key.get_name()} {key.get_base64()}\n"
        with self._learn_lock:
            # Hosts of one fan-out that share an address all find it unknown at once: the
            # first learns it; the others find it learned, or a different key (refused).
            known = _learned_keys(path, t.known_hosts_name, key.get_name())
            if key.get_base64() in known:
                return
            if known:
                raise HostFailed(f"{t.name}: {t.address} offered the host key "
                                 f"{key.get_name()} {fingerprint(key)}, but a different one "
                                 f"was learned for it a moment ago (in {path}); this may be "
                                 "an attack: ask the host's owner")
            if self.on_learned is not None:
                self.on_learned(run_id, {"host_name": t.name, "address": t.address,
                                         "known_hosts_name": t.known_hosts_name,
                                         "key_type": key.get_name(),
                                         "fingerprint": fingerprint(key), "file": str(path)})
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)

    # ── the command ─────────────────────────────────────────────────────────

    def _run_command(self, conn: _Connection, request: ExecRequest, on_output: OutputFn,
                     cancel: threading.Event, deadline: float | None, run: _HostRun) -> None:
        token = secrets.token_hex(16)
        try:
            chan = conn.client.get_transport().open_session(timeout=CONNECT_TIMEOUT_S)
            chan.exec_command(REMOTE_LOADER)
            script = remote_script(request, token, run.name)
            chan.sendall(script.encode("utf-8", "surrogateescape"))
            chan.shutdown_write()
        except Exception as e:  # noqa: BLE001 - paramiko raises several kinds here
            raise HostFailed(f"{run.name}: cannot start the command on {conn.target.address}: "
                             f"{e or type(e).__name__}") from None
        transport = conn.client.get_transport()
        stdout = _OutputsSplitter(token, lambda data: on_output("stdout", data, run.name))
        try:
            ended = _Channel(chan, run.name, stdout.feed,
                             lambda data: on_output("stderr", data, run.name),
                             lambda sig: _kill(transport, token, sig)).follow(
                cancel, deadline, self.options.grace_s)
        finally:
            chan.close()
        stdout.close()
        run.exit_code = ended.exit_code
        if ended.cancelled:
            run.outcome = CANCELLED
        elif ended.timed_out:
            run.outcome = TIMED_OUT
        elif ended.exit_code == 0:
            run.outcome = SUCCESS
        run.error = ended.error
        if ended.timed_out and run.error is None:
            run.error = f"{run.name}: timed out; the remote command was stopped"
        run.outputs, run.warnings = stdout.outputs(run.name)


@dataclass
class _Ended:
    exit_code: int | None
    timed_out: bool = False
    cancelled: bool = False
    error: str | None = None


class _Channel:
    """Streams one remote command's output until it ends; stops it when told to."""

    def __init__(self, chan: Any, host: str, on_stdout: Callable[[bytes], None],
                 on_stderr: Callable[[bytes], None], kill: Callable[[str], None]) -> None:
        self.chan = chan
        self.host = host
        self.on_stdout = on_stdout
        self.on_stderr = on_stderr
        self.kill = kill

    def follow(self, cancel: threading.Event, deadline: float | None,
               grace_s: float) -> _Ended:
        timed_out = cancelled = False
        while not self.chan.exit_status_ready():
            if cancel.is_set():
                cancelled = True
                break
            if deadline is not None and time.monotonic() >= deadline:
                timed_out = True
                break
            if not self._read():
                self._wait(_POLL_S)
        error = None
        if (timed_out or cancelled) and not self._stop(grace_s):
            error = (f"{self.host}: the remote command did not end after SIGTERM and "
                     "SIGKILL to its process group; it may still be running there")
        self._drain()
        code = self.chan.exit_status if self.chan.status_event.is_set() else -1
        if code == -1 and not (timed_out or cancelled) and error is None:
            # OpenSSH reports a command killed by a signal with exit-signal, which paramiko
            # does not read; like the ssh client, call it 255.
            code = 255
            error = (f"{self.host}: the remote command ended without an exit status "
                     "(killed by a signal, or the connection was lost)")
        exit_code = None if code == -1 else code
        return _Ended(exit_code, timed_out, cancelled, error)

    def _read(self) -> bool:
        got = False
        while self.chan.recv_ready():
            data = self.chan.recv(READ_SIZE)
            if not data:
                break
            self.on_stdout(data)
            got = True
        while self.chan.recv_stderr_ready():
            data = self.chan.recv_stderr(READ_SIZE)
            if not data:
                break
            self.on_stderr(data)
            got = True
        return got

    def _wait(self, seconds: float) -> None:
        if self.chan.eof_received or self.chan.closed:
            # After EOF the channel's pipe stays readable: wait for the exit status instead.
            self.chan.status_event.wait(seconds)
        else:
            select.select([self.chan], [], [], seconds)

    def _drain(self) -> None:
        """After the end: what is still in flight, until EOF or a short quiet time."""
        give_up = time.monotonic() + 1.0
        quiet_until = time.monotonic() + 0.2
        while not (self.chan.eof_received or self.chan.closed) or self.chan.recv_ready() \
                or self.chan.recv_stderr_ready():
            now = time.monotonic()
            if now >= min(give_up, quiet_until):
                break
            if self._read():
                quiet_until = time.monotonic() + 0.2
            else:
                self._wait(0.02)

    def _stop(self, grace_s: float) -> bool:
        """SIGTERM, then SIGKILL after the grace period; True once the command has ended."""
        for sig, wait_s in (("TERM", grace_s), ("KILL", 2.0)):
            try:
                self.kill(sig)
            except Exception:  # noqa: BLE001 - a dead connection cannot carry the kill
                return bool(self.chan.exit_status_ready())
            end = time.monotonic() + wait_s
            while time.monotonic() < end and not self.chan.exit_status_ready():
                if not self._read():
                    self._wait(0.02)
            if self.chan.exit_status_ready():
                return True
        return False


def _remote_sh(script: str) -> str:
    """An exec request that runs SCRIPT with sh, whatever the user's login shell is."""
    return "sh -c " + shlex.quote(script)


def _kill(transport: Any, token: str, sig: str) -> None:
    """Signal the process group the command wrote down (waiting a moment for it to do so)."""
    script = (f'{_files(token)}; i=0; while [ ! -s "$opsrun_f.pgid" ] && [ $i -lt 20 ]; do '
              'sleep 0.1; i=$((i+1)); done; read -r pg < "$opsrun_f.pgid" && '
              f'kill -s {sig} -- "-$pg"')
    chan = transport.open_session(timeout=CONNECT_TIMEOUT_S)
    try:
        chan.exec_command(_remote_sh(script))
        chan.shutdown_write()
        chan.status_event.wait(CONNECT_TIMEOUT_S)
    finally:
        chan.close()


def remote_script(request: ExecRequest, token: str, host: str = "") -> str:
    """What the remote loader evaluates: exports, $OPSRUN_OUTPUT, cd, then the step's shell.

    Every value is one single-quoted word, so no value is ever shell syntax.
    """
    from opsrun.executors.local import shell_argv

    lines = [
        _files(token),
        # This loader is a shell level: said so, bash (which sources ~/.bashrc when sshd
        # starts it at level 1) does not run the user's rc files a second time for the step.
        'SHLVL=$((${SHLVL:-0} + 1)); export SHLVL',
        # The process group, for a timeout's kill: /proc when there is one, else ps.
        'if [ -r /proc/$$/stat ]; then read -r _ _ _ _ opsrun_pg _ < /proc/$$/stat; '
        'else opsrun_pg=$(ps -o pgid= -p $$ | tr -d " "); fi',
        '(umask 077 && set -C && echo "${opsrun_pg:-$$}" > "$opsrun_f.pgid") 2>/dev/null',
    ]
    env = {**request.env, "OPSRUN_HOST": host} if host else dict(request.env)
    for name, value in env.items():
        if name in _LOCAL_ONLY_ENV or not _ENV_NAME.fullmatch(name):
            continue
        lines.append(f"export {name}={shlex.quote(value)}")
    lines.append('OPSRUN_OUTPUT="$opsrun_f.output"; export OPSRUN_OUTPUT')
    lines.append('(umask 077 && set -C && : > "$OPSRUN_OUTPUT") 2>/dev/null || { echo "opsrun: '
                 'cannot create $OPSRUN_OUTPUT; outputs of this step are lost" >&2; '
                 'OPSRUN_OUTPUT=/dev/null; }')
    if request.workdir:
        lines.append(f"cd -- {_remote_path(request.workdir)} || exit 1")
    argv = shell_argv(request.step.shell, request.script)
    start, end = _markers(token)
    lines += [
        " ".join(shlex.quote(w) for w in argv),
        "opsrun_rc=$?",
        f'if [ -s "$opsrun_f.output" ]; then printf %s {shlex.quote(start)}; '
        f'cat -- "$opsrun_f.output"; printf %s {shlex.quote(end)}; fi',
        'rm -f -- "$opsrun_f.output" "$opsrun_f.pgid"',
        "exit $opsrun_rc",
    ]
    return "\n".join(lines) + "\n"


def _markers(token: str) -> tuple[str, str]:
    return f"<<opsrun-outputs-{token}>>", f"<<opsrun-outputs-end-{token}>>"


class _OutputsSplitter:
    """Passes stdout on, except the $OPSRUN_OUTPUT file the loader prints between markers.

    A piece at the end of a chunk that could be the start of a marker is held back until
    the next chunk shows whether it is one.
    """

    def __init__(self, token: str, emit: Callable[[bytes], None]) -> None:
        start, end = _markers(token)
        self.start, self.end = start.encode(), end.encode()
        self.emit = emit
        self.pending = b""
        self.collected = bytearray()
        self.state = "output"  # output → outputs → after (done)
        self.too_big = False

    def feed(self, data: bytes) -> None:
        data = self.pending + data
        self.pending = b""
        while data:
            if self.state == "outputs":
                at = data.find(self.end)
                if at < 0:
                    keep = _partial_suffix(data, self.end)
                    self._collect(data[:len(data) - keep])
                    self.pending = data[len(data) - keep:]
                    return
                self._collect(data[:at])
                data = data[at + len(self.end):]
                self.state = "after"
                continue
            if self.state == "after":
                self.emit(data)
                return
            at = data.find(self.start)
            if at < 0:
                keep = _partial_suffix(data, self.start)
                if len(data) > keep:
                    self.emit(data[:len(data) - keep])
                self.pending = data[len(data) - keep:]
                return
            if at:
                self.emit(data[:at])
            data = data[at + len(self.start):]
            self.state = "outputs"

    def _collect(self, data: bytes) -> None:
        room = step_outputs.MAX_OUTPUT_FILE_BYTES + 1 - len(self.collected)
        if len(data) > room:
            self.too_big = True
        self.collected += data[:max(0, room)]

    def close(self) -> None:
        if self.pending and self.state != "outputs":
            self.emit(self.pending)
        self.pending = b""

    def outputs(self, host: str) -> tuple[dict[str, str], list[str]]:
        if self.state == "outputs":
            return {}, [f"{host}: $OPSRUN_OUTPUT was cut short; its outputs are lost"]
        if self.too_big or len(self.collected) > step_outputs.MAX_OUTPUT_FILE_BYTES:
            return {}, [f"{host}: $OPSRUN_OUTPUT is over "
                        f"{step_outputs.MAX_OUTPUT_FILE_BYTES:,} bytes; only files up to that "
                        "size are read"]
        if not self.collected:
            return {}, []
        outputs, warnings = step_outputs.parse(bytes(self.collected).decode("utf-8", "replace"))
        return outputs, [f"{host}: {w}" for w in warnings]


def _partial_suffix(data: bytes, marker: bytes) -> int:
    """The length of the longest end of `data` that is a start of `marker`."""
    for n in range(min(len(data), len(marker) - 1), 0, -1):
        if data.endswith(marker[:n]):
            return n
    return 0


def _files(token: str) -> str:
    """The shell assignment of the prefix of this command's private remote files."""
    return f'opsrun_f="${{TMPDIR:-/tmp}}/opsrun-{token}"'


def _remote_path(path: str) -> str:
    """A path for the remote shell: `~` and `~/…` are the remote user's home."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def _learned_keys(path: Path, name: str, key_type: str) -> set[str]:
    """The base64 keys of `key_type` that opsrun's own known_hosts file holds for `name`."""
    try:
        text = path.read_text("utf-8", "replace")
    except FileNotFoundError:
        return set()
    found = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and name in parts[0].split(",") and parts[1] == key_type:
            found.add(parts[2])
    return found


class _Policy:
    """paramiko's hook for a host whose key is not known: refuse, or learn (accept-new)."""

    def __init__(self, executor: SshExecutor, run_id: str, target: Target) -> None:
        self.executor, self.run_id, self.target = executor, run_id, target
        self.learned = False

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        if not self.executor.options.accept_new_hosts:
            raise _UnknownHostKey(key)
        self.executor.learn(self.run_id, self.target, key)
        self.learned = True


def _open_socket(t: Target, timeout: float) -> socket.socket:
    try:
        return socket.create_connection((t.hostname, t.port), timeout=timeout)
    except socket.gaierror as e:
        raise HostFailed(f"{t.name}: cannot resolve {t.hostname!r}: {e.strerror}; check "
                         "`hostname:` in the inventory") from None
    except (socket.timeout, TimeoutError):
        raise HostFailed(f"{t.name}: cannot connect to {t.hostname}:{t.port}: no answer "
                         f"within {timeout:g}s") from None
    except OSError as e:
        raise HostFailed(f"{t.name}: cannot connect to {t.hostname}:{t.port}: "
                         f"{e.strerror or e}") from None


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def _has_entry(path: Path, name: str) -> bool:
    if not path.is_file():
        return False
    try:
        keys = _paramiko().HostKeys(str(path))
    except (OSError, UnicodeDecodeError):
        return False
    return keys.lookup(name) is not None


def _combine(runs: Iterable[_HostRun], cancel: threading.Event) -> ExecResult:
    """One result for the step: it succeeds when every host did."""
    runs = list(runs)
    hosts = {r.name: r.record() for r in runs}
    warnings = [w for r in runs for w in r.warnings]
    failed = [r for r in runs if r.outcome != SUCCESS]
    cancelled = cancel.is_set() and any(r.outcome == CANCELLED for r in runs)
    timed_out = any(r.outcome == TIMED_OUT for r in runs)
    if len(runs) == 1:
        (r,) = runs
        error = r.error if r.outcome != SUCCESS or r.error else None
        return ExecResult(r.exit_code, timed_out, cancelled, error, dict(r.outputs), warnings,
                          hosts)
    if not failed:
        return ExecResult(0, hosts=hosts, warnings=warnings)
    code = next((r.exit_code for r in failed if r.exit_code not in (None, 0)), None)
    parts = [f"{r.name} ({_why(r)})" for r in failed]
    error = f"{len(failed)} of {len(runs)} hosts failed: " + "; ".join(parts)
    return ExecResult(code, timed_out, cancelled, error, {}, warnings, hosts)


def _why(r: _HostRun) -> str:
    if r.outcome == TIMED_OUT:
        return "timed out"
    if r.outcome == CANCELLED:
        return "cancelled"
    if r.error:
        return r.error.removeprefix(f"{r.name}: ")
    return f"exit code {r.exit_code}"
