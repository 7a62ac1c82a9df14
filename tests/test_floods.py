"""Floods through the real program, nothing lost, memory bounded (tests/floods.py).

Sizes: the issue's full sizes for `dispatch --dry-run` (100,000 events), the log burst
(50,000 lines) and the files (1,000); 20,000 events for `dispatch` with real runs and for
`emit`, by the same code paths. OPSRUN_FLOODS=full runs every flood at the full size, as
`python bench/floods.py` does. Each test prints its figure (time, peak RSS): `pytest -s`.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.floods import FLOODS, FULL, SUITE

SIZES = FULL if os.environ.get("OPSRUN_FLOODS") == "full" else SUITE


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(FLOODS))
def test_flood(name: str, tmp_path: Path) -> None:
    figure = FLOODS[name](tmp_path, SIZES[name])
    print(figure.line())
