"""A run's private scratch folder: the event file and the `$OPSRUN_OUTPUT` files of its steps.

Made with os.mkdir (mode 0700) under $TMPDIR or /tmp, named after the run and the process;
tempfile and shutil, which do the same in general, cost more to import than a short run
takes. What the fast path does not cover (a name taken, a folder a step made inside) goes
to them.
"""
from __future__ import annotations

import os


def make(run_id: str) -> str:
    """A new folder of this process's own for a run; OSError if none can be made."""
    base = os.environ.get("TMPDIR") or "/tmp"
    path = os.path.join(base, f"opsrun-{run_id}-{os.getpid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:  # the same run again in this process, its last folder kept
        import tempfile

        return tempfile.mkdtemp(prefix=f"opsrun-{run_id}-")
    return path


def make_part(run_folder: str, n: int) -> str:
    """A folder inside a run's for one part that runs beside others (a branch, an item)."""
    path = os.path.join(run_folder, f"part-{n}")
    os.mkdir(path, 0o700)
    return path


def remove(path: str) -> None:
    """Remove the folder and what it holds; errors are ignored (it is only scratch)."""
    try:
        with os.scandir(path) as entries:
            nested = False
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    nested = True
                else:
                    os.unlink(entry.path)
        if not nested:
            os.rmdir(path)
            return
    except OSError:
        pass
    import shutil

    shutil.rmtree(path, ignore_errors=True)
