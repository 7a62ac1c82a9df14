"""The wheel and the sdist, built and installed the way a user or a packager does it.

`python -m build` makes both from a copy of the project as it is now; each is installed
into a fresh virtualenv, and the installed `opsrun` must run, validate a runbook, write a
starter folder, and have put the completion scripts and the schema where shells and
editors look. Building and installing fetch setuptools and opsrun's dependencies from the
package index (as CI can), once per session.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from opsrun import __version__
from tests.helpers.tree import ROOT, copy_project

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

COMPLETIONS = {  # where each shell looks under a prefix → the generated script it must be
    "share/bash-completion/completions/opsrun": "opsrun.bash",
    "share/zsh/site-functions/_opsrun": "opsrun.zsh",
    "share/fish/vendor_completions.d/opsrun.fish": "opsrun.fish",
}


class Session:
    """Paths and environment shared by the tests: one build, one pip cache."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.home.mkdir()
        # Session fixtures are set up before the per-test HOME: keep pip off the real one.
        self.env = {**os.environ, "HOME": str(self.home),
                    "PIP_CACHE_DIR": str(root / "pip-cache"), "NO_COLOR": "1"}

    def sh(self, *argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([str(a) for a in argv], cwd=cwd, env=self.env, capture_output=True,
                           text=True, timeout=600, check=False)
        assert r.returncode == 0, f"{' '.join(map(str, argv))} failed:\n{r.stdout}{r.stderr}"
        return r

    def venv(self, name: str, install: Path, *pip_args: str) -> Path:
        """A fresh virtualenv with INSTALL (a wheel or an sdist) pip-installed into it."""
        where = self.root / name
        self.sh(sys.executable, "-m", "venv", where)
        self.sh(where / "bin" / "python", "-m", "pip", "install", "-q", *pip_args, install)
        return where


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Session, Path, Path]:
    """(session, wheel, sdist), built by `python -m build` from a copy of the project."""
    s = Session(tmp_path_factory.mktemp("packaging"))
    src = copy_project(s.root / "src")
    s.sh(sys.executable, "-m", "build", "--outdir", s.root / "dist", src)
    wheels = list((s.root / "dist").glob("opsrun-*.whl"))
    sdists = list((s.root / "dist").glob("opsrun-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list((s.root / "dist").iterdir())
    return s, wheels[0], sdists[0]


@pytest.fixture(scope="session")
def wheel_venv(built: tuple[Session, Path, Path]) -> Path:
    s, wheel, _ = built
    return s.venv("venv-wheel", wheel)


def test_wheel_contents(built: tuple[Session, Path, Path]) -> None:
    _, wheel, _ = built
    names = set(zipfile.ZipFile(wheel).namelist())
    data = f"opsrun-{__version__}.data/data/"
    for installed in COMPLETIONS:
        assert data + installed in names
    for member in ("opsrun/schema/runbook.schema.json", "opsrun/help.txt", "opsrun/py.typed",
                   "opsrun/commands/init.py", f"opsrun-{__version__}.dist-info/licenses/LICENSE"):
        assert member in names
    assert not any(n.startswith(("tests/", "runbooks/", "completions/")) for n in names)
    meta = zipfile.ZipFile(wheel).read(f"opsrun-{__version__}.dist-info/METADATA").decode()
    for line in ("License-Expression: MIT", "License-File: LICENSE",
                 "Project-URL: Issues, https://github.com/opsrun/opsrun/issues",
                 "Requires-Python: >=3.10", "Description-Content-Type: text/markdown"):
        assert line in meta, line


def test_sdist_contents(built: tuple[Session, Path, Path]) -> None:
    _, _, sdist = built
    top = f"opsrun-{__version__}/"
    with tarfile.open(sdist) as tar:
        members = {m.name.removeprefix(top): m for m in tar.getmembers()}
    for name in ("README.md", "LICENSE", "pyproject.toml", "MANIFEST.in",
                 "opsrun/schema/runbook.schema.json", "opsrun/help.txt",
                 "runbooks/hello.yaml", "runbooks/inventory.yaml",
                 "completions/opsrun.bash", "completions/opsrun.zsh", "completions/opsrun.fish",
                 "completions/opsrun", "completions/_opsrun"):
        assert name in members, name
    # The completion names for installing are real files in the sdist, not links that a
    # packager's tooling might drop.
    assert members["completions/_opsrun"].isfile()


def test_wheel_installs_and_runs(built: tuple[Session, Path, Path], wheel_venv: Path,
                                 tmp_path: Path) -> None:
    s, _, _ = built
    opsrun = wheel_venv / "bin" / "opsrun"
    assert s.sh(opsrun, "--version").stdout == f"opsrun {__version__}\n"
    assert s.sh(opsrun, "--help").stdout == (ROOT / "opsrun" / "help.txt").read_text()

    shutil.copy(ROOT / "runbooks" / "hello.yaml", tmp_path / "hello.yaml")
    assert s.sh(opsrun, "validate", "hello.yaml", cwd=tmp_path).stdout == "1 runbook valid\n"
    run = s.sh(opsrun, "run", "hello.yaml", "-p", "name=Ada", "--state-dir", tmp_path / "st",
               cwd=tmp_path)
    assert "greet | Hello, Ada!" in run.stdout

    # `opsrun init` works from an install: its schema file comes from the installed package.
    s.sh(opsrun, "init", "rb", cwd=tmp_path)
    assert s.sh(opsrun, "validate", "rb", cwd=tmp_path).stdout == "1 runbook valid\n"


def test_wheel_puts_completions_and_schema_in_place(built: tuple[Session, Path, Path],
                                                   wheel_venv: Path) -> None:
    s, _, _ = built
    for installed, generated in COMPLETIONS.items():
        path = wheel_venv / installed
        assert path.is_file(), installed
        assert path.read_text() == (ROOT / "completions" / generated).read_text(), installed
    where = s.sh(wheel_venv / "bin" / "python", "-c",
                 "import opsrun, os; print(os.path.dirname(opsrun.__file__))").stdout.strip()
    schema = Path(where) / "schema" / "runbook.schema.json"
    printed = s.sh(wheel_venv / "bin" / "opsrun", "schema").stdout
    assert json.loads(schema.read_text()) == json.loads(printed)


def test_sdist_installs(built: tuple[Session, Path, Path]) -> None:
    s, _, sdist = built
    # From the sdist alone: pip builds a wheel out of it, so every file the build needs must
    # be in it. --no-deps: the dependencies were proven by the wheel; --version and the data
    # files need none of them.
    venv = s.venv("venv-sdist", sdist, "--no-deps")
    assert s.sh(venv / "bin" / "opsrun", "--version").stdout == f"opsrun {__version__}\n"
    for installed, generated in COMPLETIONS.items():
        assert (venv / installed).read_text() == (ROOT / "completions" / generated).read_text()


def test_pipx_install_dot(built: tuple[Session, Path, Path], tmp_path: Path) -> None:
    # `pipx install .` from a checkout, as the README's readers on a workstation do: pipx
    # builds the project itself and puts `opsrun` on its own bin folder.
    s, _, _ = built
    src = copy_project(tmp_path / "checkout")
    pipx = {"PIPX_HOME": str(tmp_path / "pipx"), "PIPX_BIN_DIR": str(tmp_path / "bin"),
            "PIPX_MAN_DIR": str(tmp_path / "man"), "PIPX_DEFAULT_PYTHON": sys.executable}
    r = subprocess.run([sys.executable, "-m", "pipx", "install", "."], cwd=src,
                       env={**s.env, **pipx}, capture_output=True, text=True, timeout=600,
                       check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    opsrun = tmp_path / "bin" / "opsrun"
    assert s.sh(opsrun, "--version").stdout == f"opsrun {__version__}\n"
    run = s.sh(opsrun, "run", src / "runbooks" / "hello.yaml", "-p", "name=Ada",
               "--state-dir", tmp_path / "st")
    assert "greet | Hello, Ada!" in run.stdout
