from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.service import Service
from tests.helpers.sshd import sshd  # noqa: F401 - one sshd per session for the SSH tests


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may touch the real home or state folder: point them at a fresh temp folder."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / ".local" / "state"))
    for var in ("OPSRUN_STATE_DIR", "STATE_DIRECTORY", "OPSRUN_RUNBOOKS", "NOTIFY_SOCKET",
                "OPSRUN_DEBUG", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(var, raising=False)
    for var in list(os.environ):
        if var.startswith("OPSRUN_SECRET_"):
            monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_COLOR", "1")


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state folder of the test's own (not made yet: opsrun makes it)."""
    return tmp_path / "state"


@pytest.fixture
def env(state: Path) -> dict[str, str]:
    """The environment that points opsrun at `state`, with a short kill grace."""
    return {"OPSRUN_STATE_DIR": str(state), "OPSRUN_KILL_GRACE": "500ms"}


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture
def rbdir(tmp_path: Path) -> Path:
    """An empty runbooks folder for a service under test."""
    d = tmp_path / "runbooks"
    d.mkdir()
    return d


@pytest.fixture
def services() -> Iterator[list[Service]]:
    """Services a test starts (append them); each is stopped at the end, whatever happened."""
    made: list[Service] = []
    yield made
    for s in made:
        s.close()
