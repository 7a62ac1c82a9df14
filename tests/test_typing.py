"""`mypy --strict opsrun` stays clean (the configuration is in pyproject.toml)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_mypy_strict_is_clean(repo_root: Path, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--cache-dir",
                        str(tmp_path / "mypy-cache"), "opsrun"], cwd=repo_root,
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
