"""A copy of the project as it is now (committed or not), for tests that build or clone it.

pre-commit's try-repo clones a commit and `python -m build` writes next to the sources, so
those tests work on a copy: they see uncommitted edits, and they leave the real work tree
and its git index alone.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent

# Git needs an author; the tests' HOME is empty, so there is no ~/.gitconfig to give one.
GIT_ENV = {"GIT_AUTHOR_NAME": "opsrun tests", "GIT_AUTHOR_EMAIL": "tests@opsrun.invalid",
           "GIT_COMMITTER_NAME": "opsrun tests", "GIT_COMMITTER_EMAIL": "tests@opsrun.invalid",
           "GIT_CONFIG_NOSYSTEM": "1"}


def git(*args: str, cwd: Path) -> str:
    """Run git in CWD with a known author; fail the test with git's message if it fails."""
    r = subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **GIT_ENV},
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, f"git {' '.join(args)} failed:\n{r.stdout}{r.stderr}"
    return r.stdout


def project_files() -> list[str]:
    """The files git would commit now: tracked ones and new ones that are not ignored."""
    out = git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT)
    return sorted(f for f in out.split("\0") if f and (ROOT / f).is_file())


def copy_project(dest: Path, *, commit: bool = False) -> Path:
    """Copy the project's files into DEST; with COMMIT, make DEST a git repository of them."""
    for rel in project_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        # Symlinks stay symlinks (completions/_opsrun), as in a clone.
        shutil.copy2(ROOT / rel, target, follow_symlinks=False)
    if commit:
        git("init", "-q", "-b", "main", cwd=dest)
        git("add", "-A", cwd=dest)
        git("commit", "-q", "-m", "opsrun as under test", cwd=dest)
    return dest
