"""A Unix socket through which other processes ask a running opsrun to act.

One JSON object per line each way. The server learns who is asking from the kernel
(SO_PEERCRED: the peer's uid), never from the request, so `approve` over the socket is
as trustworthy as `approve` run by that user directly. The daemon serves
`<state>/control.sock`; a run waiting at a terminal serves `<state>/runs/<id>.sock`.

The socket is created 0660 with the state folder's group: who can reach it is decided by
the folder's permissions (0700 by default: only its owner).
"""
from __future__ import annotations

import json
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opsrun.errors import OpsrunError
from opsrun.identity import Identity, for_uid

MAX_REQUEST = 4 * 1024 * 1024  # a batch of events (each at most 1 MiB) fits
MAX_ADDRESS = 107  # sun_path holds 108 bytes, the last a NUL
Handler = Callable[[dict[str, Any], Identity], dict[str, Any]]


@dataclass(frozen=True)
class Reply:
    ok: bool
    message: str
    exit_code: int
    data: dict[str, Any]


class ControlUnavailable(Exception):
    """Nobody listens on the socket (no such file, refused, or stale)."""


class ControlLost(ControlUnavailable):
    """The server went away after the request was sent, before it answered: the request
    may or may not have been carried out."""


def peer_identity(conn: socket.socket) -> Identity:
    """Who is on the other end of a Unix socket, as the kernel says."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, gid = struct.unpack("3i", creds)
    return for_uid(uid, gid)


class Server:
    """Serves requests on a Unix socket from a thread, one short connection per request."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> Server:
        """Bind (replacing a stale socket file) and serve in the background."""
        _remove_stale(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with address(self.path) as where:
            sock.bind(where)
        _share_with_folder_group(self.path)
        sock.listen(16)
        sock.settimeout(0.2)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name=f"control:{self.path.name}",
                                         daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                who = peer_identity(conn)
                request = json.loads(_read_line(conn))
                if not isinstance(request, dict):
                    raise ValueError("a request is a JSON object")
                reply = self.handler(request, who)
            except OpsrunError as e:
                reply = {"ok": False, "message": str(e), "exit_code": int(e.exit_code)}
            except (ValueError, OSError) as e:
                reply = {"ok": False, "message": f"bad request: {e}", "exit_code": 2}
            except Exception as e:  # noqa: BLE001 - one bad request must not stop the server
                reply = {"ok": False, "message": f"internal error: {type(e).__name__}: {e}",
                         "exit_code": 70}
            try:
                conn.sendall(json.dumps(reply, default=str).encode() + b"\n")
            except OSError:
                pass


def request(path: Path, payload: dict[str, Any], *, timeout_s: float = 30.0) -> Reply:
    """Send one request; raise ControlUnavailable if nobody serves the socket (ControlLost
    if the server went away before it answered)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            with address(path) as where:
                sock.connect(where)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise ControlUnavailable(str(e)) from None
        except PermissionError as e:
            raise OpsrunError(f"cannot reach {path}: {e.strerror}; the state folder's "
                              "permissions do not let you in") from None
        try:
            sock.sendall(json.dumps(payload).encode() + b"\n")
            line = _read_line(sock)
        except (ConnectionResetError, BrokenPipeError) as e:
            raise ControlLost(str(e)) from None
        if not line:
            raise ControlLost("the connection closed without an answer")
        data = json.loads(line)
    except socket.timeout:
        raise OpsrunError(f"no answer from {path} within {timeout_s:g}s") from None
    finally:
        sock.close()
    return Reply(bool(data.get("ok")), str(data.get("message", "")),
                 int(data.get("exit_code", 0 if data.get("ok") else 1)), data)


def _read_line(sock: socket.socket) -> bytes:
    buf = b""
    while b"\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ValueError("request too large")
    return buf.split(b"\n", 1)[0]


@contextmanager
def address(path: Path) -> Iterator[str]:
    """An address for bind or connect that reaches `path` however long the path is.

    A Unix socket address holds at most 107 bytes, which a state folder in a deep home or
    temp folder can pass; then the socket is reached through an open descriptor of its
    folder, `/proc/self/fd/N/NAME`, which is short and names the same file.
    """
    text = str(path)
    if len(os.fsencode(text)) <= MAX_ADDRESS:
        yield text
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        short = f"/proc/self/fd/{fd}/{path.name}"
        if len(os.fsencode(short)) > MAX_ADDRESS:
            raise OpsrunError(f"the socket name {path.name!r} is too long for a Unix socket")
        yield short
    finally:
        os.close(fd)


def _remove_stale(path: Path) -> None:
    """A socket file left by a dead process is removed; a live one is an error."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OpsrunError(f"{path} exists and is not a socket; remove it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with address(path) as where:
            probe.connect(where)
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise OpsrunError(f"another opsrun already serves {path}")


def _share_with_folder_group(path: Path) -> None:
    folder = path.parent
    try:
        gid = folder.stat().st_gid
        if gid != os.getegid():
            os.chown(path, -1, gid)
        os.chmod(path, 0o660)
    except OSError:
        os.chmod(path, 0o600)
