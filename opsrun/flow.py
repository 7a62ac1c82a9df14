"""Running parts of a run at the same time: parallel branches and for_each items.

`run_all` starts up to `limit` workers at once, each taking the next unit as soon as it is
free, and returns when every started unit has ended. With `fail_fast`, the first failure
cancels the units still running (their executors stop their processes) and starts no
more; cancelling the run cancels them all the same way.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from opsrun import run_types as rt

Unit = Callable[[rt.Cancel], bool]  # runs one branch or item; True when it succeeded


def run_all(units: Sequence[Unit], *, limit: int, fail_fast: bool, cancel: threading.Event,
            why_failed: Callable[[int], str]) -> list[bool | None]:
    """Each unit's success, or None for a unit that never started (stopped first)."""
    stop = rt.Cancel()
    if isinstance(cancel, rt.Cancel):
        cancel.link(stop)
    elif cancel.is_set():
        stop.cancel(rt.cancel_reason(cancel))
    results: list[bool | None] = [None] * len(units)
    errors: list[BaseException] = []
    pending = iter(range(len(units)))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                i = None if stop.is_set() else next(pending, None)
            if i is None:
                return
            try:
                results[i] = ok = units[i](stop)
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the others end
                errors.append(e)
                stop.cancel(rt.CANCELLED, "a record could not be written")
                return
            if not ok and fail_fast and not stop.is_set():
                stop.cancel(rt.CANCELLED, why_failed(i))

    workers = [threading.Thread(target=work, name=f"opsrun-part-{n}", daemon=True)
               for n in range(max(1, min(limit, len(units))))]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        if isinstance(cancel, rt.Cancel):
            cancel.unlink(stop)
    if errors:
        raise errors[0]
    return results
