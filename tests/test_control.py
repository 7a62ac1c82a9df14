"""The control socket: requests and peer identity, also when the state folder's path is
longer than a Unix socket address can hold."""
from __future__ import annotations

import json
import os
from pathlib import Path

from opsrun import control_socket
from opsrun.identity import Identity
from tests.helpers.cli import opsrun
from tests.helpers.service import Service


def deep(tmp_path: Path) -> Path:
    folder = tmp_path / ("a-rather-long-folder-name-" * 5) / "state"
    assert len(str(folder / "runs" / "01M8R7A3CKX42D1RZ8P922FSBF.sock")) > 108
    return folder


def echo(request: dict, who: Identity) -> dict:
    return {"ok": True, "message": f"{request['op']} from {who.user}", "exit_code": 0,
            "uid": who.uid}


def test_request_and_peer_identity(tmp_path: Path) -> None:
    with control_socket.Server(tmp_path / "c.sock", echo):
        reply = control_socket.request(tmp_path / "c.sock", {"op": "status"})
    assert reply.ok and reply.data["uid"] == os.getuid()


def test_a_socket_path_longer_than_an_address_works(tmp_path: Path) -> None:
    folder = deep(tmp_path)
    folder.mkdir(parents=True)
    path = folder / "01M8R7A3CKX42D1RZ8P922FSBF.sock"
    with control_socket.Server(path, echo):
        assert path.exists()
        reply = control_socket.request(path, {"op": "ping"})
        assert reply.ok and reply.message.startswith("ping from ")
        # A second server on the same live socket is refused, not a silent replacement.
        second = control_socket.Server(path, echo)
        try:
            second.start()
        except control_socket.OpsrunError as e:
            assert "already serves" in str(e)
        else:
            second.stop()
            raise AssertionError("a second server took over a live socket")
    assert not path.exists()


def test_the_service_answers_status_from_a_deep_state_folder(tmp_path: Path) -> None:
    rbdir = tmp_path / "rb"
    rbdir.mkdir()
    (rbdir / "e.yaml").write_text("on: [{event: {where: {kind: x}}}]\nsteps:\n  - run: 'true'\n")
    svc = Service(tmp_path, rbdir)
    svc.state = deep(tmp_path)
    svc.env["OPSRUN_STATE_DIR"] = str(svc.state)
    try:
        svc.start()
        status = opsrun("status", "--json", env=svc.env)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["running"] is True
    finally:
        svc.stop()
