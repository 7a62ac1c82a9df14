"""Floods through the real program, nothing lost, memory bounded (tests/floods.py).

Sizes: the issue's full sizes for `dispatch --dry-run` (100,000 events), the log burst
(50,000 lines) and the files (1,000); 20,000 events for `dispatch` with real runs and for
`emit`, by the same code paths. OPSRUN_FLOODS=full runs every flood at the full size, as
`python bench/floods.py` does. Each test prints its figure (time, peak RSS): `pytest -s`.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from opsrun.commands.events import BATCH
from tests.floods import FLOODS, FULL, SUITE, marker_lines, write_runbook
from tests.helpers.cli import command
from tests.helpers.service import Service
from tests.helpers.wait import wait_for

SIZES = FULL if os.environ.get("OPSRUN_FLOODS") == "full" else SUITE


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(FLOODS))
def test_flood(name: str, tmp_path: Path) -> None:
    figure = FLOODS[name](tmp_path, SIZES[name])
    print(figure.line())


def test_emit_from_a_pipe_that_stays_open(tmp_path: Path) -> None:
    """A stream into `opsrun emit -` is queued batch by batch as it comes, not at its end."""
    marks = tmp_path / "marks"
    write_runbook(tmp_path / "runbooks", "r.yaml", f"""\
        on: [{{event: {{where: {{n: 0}}}}}}]
        steps:
          - run: echo ${{{{ event.n }}}} >> {marks}
        """)
    svc = Service(tmp_path, tmp_path / "runbooks")
    emit = None
    try:
        svc.start()
        emit = subprocess.Popen(command("emit", "-"), env={**os.environ, **svc.env},
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert emit.stdin is not None
        # One event more than a batch: the first batch goes, the pipe stays open.
        emit.stdin.write("".join(json.dumps({"kind": "tick", "n": n}) + "\n"
                                 for n in range(BATCH + 1)))
        emit.stdin.flush()
        wait_for(lambda: marker_lines(marks) == ["0"], timeout=60, message=svc.log)
        assert emit.poll() is None
        emit.stdin.close()
        emit.stdin = None  # communicate() must not flush the closed pipe again
        out, _ = emit.communicate(timeout=60)
        assert emit.returncode == 0
        assert f"queued {BATCH + 1} events for the running service" in out
        assert svc.stop() == 0
    finally:
        if emit is not None and emit.poll() is None:
            emit.kill()
        svc.close()
