"""What every event source is: a blocking `run(stop, emit)` loop, and small shared helpers.

The contract between a source and its caller (the daemon, `opsrun dispatch`, the tests):

- `run(stop, emit)` blocks until `stop` is set, then returns promptly (every wait inside
  is a wait on `stop` with a timeout, never a bare sleep). It is meant for its own thread.
- `emit(events)` hands over a batch of events. When `emit` returns, the caller has *taken*
  them: recorded them durably, queued them, or started their runs. Sources that keep a
  position (log offsets, schedule marks) advance it only after `emit` returns, so a crash
  between the two repeats events rather than losing them (at-least-once).
- An exception from `emit` ends `run` with that exception and nothing after the failed
  batch is committed; the caller decides whether to start the source again.
- Problems with the watched things themselves (a file that cannot be read, a watch limit)
  are logged on the `opsrun.sources` logger and the source carries on.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from opsrun.checkpoints import Checkpoint, FileStat
from opsrun.event import Event

if TYPE_CHECKING:
    from opsrun.store import LogPosition

log = logging.getLogger("opsrun.sources")

Emit = Callable[[Sequence[Event]], None]
"""Takes a batch of events; returning means they are taken (see the module docstring)."""


class Source(Protocol):
    """A producer of events; see the module docstring for the contract."""

    name: str

    def run(self, stop: threading.Event, emit: Emit) -> None:
        """Produce events until `stop` is set."""


class PositionStore(Protocol):
    """Where log positions are kept (opsrun.store.Store implements it)."""

    def get_log_position(self, key: str) -> LogPosition | None:
        """The stored position for a followed file, or None."""

    def set_log_position(self, key: str, device: int, inode: int, offset: int) -> None:
        """Store the position for a followed file."""


class FileStateStore(Protocol):
    """Where the file source keeps what it reported (opsrun.store.Store implements it)."""

    def file_baseline(self, trigger_key: str) -> dict[str, FileStat] | None:
        """Each path's state as last reported, or None if the trigger was never looked at."""

    def set_file_baseline(self, trigger_key: str, states: Mapping[str, FileStat]) -> None:
        """Take these states as reported."""

    def keep_file_baselines(self, trigger_keys: Iterable[str]) -> None:
        """Forget the states of every other trigger."""

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Store states that no event's runs carry."""


class MarkStore(Protocol):
    """Where schedule marks are kept (opsrun.store.Store implements it)."""

    def get_schedule_mark(self, trigger_key: str) -> datetime | None:
        """When the schedule last fired (or was armed), or None."""

    def set_schedule_mark(self, trigger_key: str, fired_at: datetime) -> None:
        """Store when the schedule last fired (or was armed)."""


def start_thread(source: Source, stop: threading.Event, emit: Emit) -> threading.Thread:
    """Run a source in a daemon thread named after it; failures are logged, not raised."""
    def target() -> None:
        try:
            source.run(stop, emit)
        except Exception:
            log.exception("the %s source stopped on an error", source.name)

    thread = threading.Thread(target=target, name=f"opsrun-source-{source.name}", daemon=True)
    thread.start()
    return thread
