"""File source: inotify, through watchfiles, on the folders of the file triggers' globs.

What is watched. For each glob, the deepest folder it names literally (`/srv/drop` for
`/srv/drop/*.csv`): recursively when the glob reaches below it (`**`, `/srv/*/in/*.csv`),
flat otherwise. What the kernel reports there is filtered with the globs and `ignore:`.
A folder that does not exist yet is waited for from its nearest existing parent.

What is reported. Changes are collected per trigger until its `debounce` has passed with
no new change (at most max(10 × debounce, 1 s) under constant change). Then each path is
reported once, from its state before the first change and its state now: absent → present
is `added`, present → absent `deleted`, present → present but different (inode, size,
mtime or ctime) `modified`, absent → absent nothing. So an editor's save through a
temporary file and a rename is ONE `modified` of the real path, and the temporary file is
never seen. Folders are not reported, only what is in them.

Across restarts. With a state store (the service), what was reported of each path is kept
per trigger, written in the transaction that records the runs of the change (see
opsrun.checkpoints). At start the disk is compared with it, and every difference is
reported like any other change: files changed while the service was down, and changes
still being debounced when it was killed, are reported once; those already reported are
not reported again. The first start of a trigger (or one whose paths changed: a new
trigger key) takes the disk as it is, and reports nothing.

Never a silent gap. watchfiles drops the kernel's queue-overflow notice, so this source
rescans (compares its snapshot of every matching path with the disk) after a flood of
changes, whenever a watch is (re)established, and every `rescan_interval_s`; what a rescan
finds is reported like any other change and logged. When the kernel's watch limit is
reached the source says so, names the sysctl to raise, and falls back to polling.
"""
from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from watchfiles._rust_notify import RustNotify

from opsrun.checkpoints import Checkpoint
from opsrun.event import Event, new_event
from opsrun.globs import PathGlob, compile_glob, ignored
from opsrun.runbook import FileTrigger
from opsrun.sources.base import Emit, FileStateStore, log

STEP_MS = 20  # quiet time before watchfiles hands changes over; also its idle tick
GROUP_MS = 100  # the longest it collects before handing over, under constant change
POLL_DELAY_MS = 500  # scan interval once the watch limit forced polling
FLOOD = 2000  # changes in one batch after which events may have been dropped: rescan
_WAKE_S = 0.1  # the longest the flush loop waits before looking at `stop` again
ADDED = 1  # watchfiles' Change.added
IN_FLIGHT_S = 2.0  # a change younger than this, found by a rescan, is not called missed

_Stat = tuple[int, int, int, int, int]  # inode, device, size, mtime_ns, ctime_ns


class Notifier(Protocol):
    """The part of watchfiles' RustNotify this source uses (tests script a fake)."""

    def watch(self, debounce_ms: int, step_ms: int, timeout_ms: int,
              stop_event: Any) -> Any: ...

    def close(self) -> None: ...


NotifierFactory = Callable[[list[str], bool, bool], Notifier]  # paths, recursive, polling


def rust_notifier(paths: list[str], recursive: bool, polling: bool) -> Notifier:
    """A watchfiles watcher on `paths`; its kernel watches exist when this returns.

    The first attempt is strict: with watchfiles' `ignore_permission_denied` the kernel's
    watch limit is swallowed too, and a recursive watch then silently covers part of the
    tree. So the limit is raised here (the source says so and falls back to polling).
    Only a folder this user cannot read makes it try again leniently, with a warning:
    inotify may then miss changes in that tree, which the periodic rescan finds.
    """
    notifier: Notifier
    try:
        notifier = RustNotify(paths, False, polling, POLL_DELAY_MS, recursive, False)
    except PermissionError as e:
        log.warning("file source: %s; changes below %s may be seen only by the periodic "
                    "rescan: make the folder readable or narrow the glob", e, _some(paths))
        notifier = RustNotify(paths, False, polling, POLL_DELAY_MS, recursive, True)
    return notifier


@dataclass
class _Watch:
    key: str
    trigger: FileTrigger
    globs: tuple[PathGlob, ...]
    pending: dict[str, _Stat | None] = field(default_factory=dict)  # path -> state before
    first: float = 0.0
    deadline: float = 0.0

    def wants(self, path: str) -> bool:
        for g in self.globs:
            if g.matches(path):
                return not ignored(path, self.trigger.ignore, g.base)
        return False


class _Until:
    """A stop event for watchfiles that is set when any of its conditions holds."""

    def __init__(self, check: Callable[[], bool]) -> None:
        self.is_set = check


class FileSource:
    """Reports `added`/`modified`/`deleted` for the paths of file triggers."""

    name = "file"

    def __init__(self, watches: Sequence[tuple[str, FileTrigger]], *,
                 rescan_interval_s: float = 60.0, notifier: NotifierFactory = rust_notifier,
                 clock: Callable[[], float] = time.monotonic,
                 states: FileStateStore | None = None) -> None:
        self._watches = [_Watch(k, t, tuple(compile_glob(p) for p in t.paths))
                         for k, t in watches]
        self._states = states
        self._notifier = notifier
        self._clock = clock
        self._rescan_interval = rescan_interval_s
        self._cond = threading.Condition()
        self._snapshot: dict[str, _Stat] = {}
        self._missing: set[str] = set()  # literal folders of globs that do not exist yet
        self._targets: set[str] = set()
        self._generation = 0  # bumped when the folders to watch change
        self._halt = threading.Event()
        self._polling = False
        self._rescan_at = 0.0
        self._up: set[bool] = set()
        self.ready = threading.Event()
        """Set once the kernel watches of every folder are in place."""

    def run(self, stop: threading.Event, emit: Emit) -> None:
        """Watch until `stop` is set; see the module docstring."""
        self._snapshot = self._scan()
        if self._states is not None:
            self._restore()
        self._rescan_at = self._clock() + self._rescan_interval
        self._halt.clear()
        threads = [threading.Thread(target=self._watch_loop, args=(recursive, stop),
                                    name=f"opsrun-files-{'tree' if recursive else 'flat'}",
                                    daemon=True) for recursive in (True, False)]
        for t in threads:
            t.start()
        try:
            self._flush_loop(stop, emit)
        finally:
            self._halt.set()
            for t in threads:
                t.join(timeout=5)

    def rescan(self, reason: str = "periodic") -> int:
        """Compare the snapshot with the disk and report the differences; return how many."""
        current = self._scan()
        with self._cond:
            old = dict(self._snapshot)
        changed = sorted(p for p in old.keys() | current.keys() if old.get(p) != current.get(p))
        if not changed:
            return 0
        self._feed(changed)
        # A change made a moment ago may simply still be on its way from the kernel.
        recent = time.time_ns() - int(IN_FLIGHT_S * 1e9)
        missed = [p for p in changed if p not in current or current[p][3] < recent]
        if reason == "watch started":
            log.info("file source: %d change(s) while the watch was being set up: %s",
                     len(changed), _some(changed))
        elif missed:
            log.warning("file source: a rescan found %d change(s) that inotify had not "
                        "reported (its event queue may have overflowed): %s", len(missed),
                        _some(missed))
        return len(changed)

    def _restore(self) -> None:
        """Report what changed since the states last reported: while the service was down,
        or in the moments before it was killed (a change still being debounced)."""
        assert self._states is not None
        self._states.keep_file_baselines(w.key for w in self._watches)
        now = self._clock()
        for w in self._watches:
            current = {p: st for p, st in self._snapshot.items() if w.wants(p)}
            stored = self._states.file_baseline(w.key)
            if stored is None:
                self._states.set_file_baseline(w.key, current)
                continue
            changed = sorted(p for p in stored.keys() | current.keys()
                             if stored.get(p) != current.get(p))
            if not changed:
                continue
            log.info("file source: %d change(s) since the service last reported on %s: %s",
                     len(changed), ", ".join(w.trigger.paths), _some(changed))
            with self._cond:
                w.first = w.deadline = now
                for path in changed:
                    w.pending.setdefault(path, stored.get(path))

    # ── collecting changes ──────────────────────────────────────────────────

    def _feed(self, paths: Iterable[str]) -> None:
        now = self._clock()
        with self._cond:
            for path in paths:
                routes = [w for w in self._watches if w.wants(path)]
                if not routes:
                    continue
                before = self._snapshot.get(path)
                self._remember(path, _stat(path))
                for w in routes:
                    if not w.pending:
                        w.first = now
                    w.pending.setdefault(path, before)
                    # watchfiles already waited STEP_MS of quiet before handing this over
                    w.deadline = now + max(w.trigger.debounce_s - STEP_MS / 1000, 0.0)
            self._cond.notify_all()

    def _remember(self, path: str, state: _Stat | None) -> None:
        if state is None:
            self._snapshot.pop(path, None)
        else:
            self._snapshot[path] = state

    def _scan(self) -> dict[str, _Stat]:
        found: dict[str, _Stat] = {}
        for w in self._watches:
            for g in w.globs:
                for path in g.expand():
                    state = _stat(path)
                    if state is not None and w.wants(path):
                        found[path] = state
        return found

    # ── reporting ───────────────────────────────────────────────────────────

    def _flush_loop(self, stop: threading.Event, emit: Emit) -> None:
        while not stop.is_set():
            now = self._clock()
            if now >= self._rescan_at:
                self._rescan_at = now + self._rescan_interval
                self.rescan()
            with self._cond:
                events, quiet, wake = self._take_due(self._clock())
                if not events and not quiet:
                    self._cond.wait(timeout=max(0.0, min(wake, _WAKE_S)))
                    continue
            if quiet and self._states is not None:
                # Paths whose change no event reports: nothing is lost by storing them now.
                self._states.save_checkpoint(Checkpoint(file_states=tuple(quiet)))
            if events:
                emit(events)

    def _take_due(self, now: float
                  ) -> tuple[list[Event], list[tuple[str, str, _Stat | None]], float]:
        """Changes whose debounce is over: events (each with the state it reports, to be
        stored with its runs), the states of paths reported by no event, and when to look
        again."""
        events: list[Event] = []
        quiet: list[tuple[str, str, _Stat | None]] = []
        wake = self._rescan_at - now
        for w in self._watches:
            if not w.pending:
                continue
            cap = w.first + max(10 * w.trigger.debounce_s, 1.0)
            if now < w.deadline and now < cap:
                wake = min(wake, w.deadline - now, cap - now)
                continue
            batch, w.pending = w.pending, {}
            for path, before in sorted(batch.items()):
                after = _stat(path)
                self._remember(path, after)
                change = _change(before, after)
                if change is not None and change in w.trigger.events:
                    event = new_event("file", trigger=w.key, path=path, change=change)
                    events.append(event._replace(checkpoint=Checkpoint(
                        file_states=((w.key, path, after),))))
                elif change is not None:
                    quiet.append((w.key, path, after))
        return events, quiet, wake

    # ── the kernel watches ──────────────────────────────────────────────────

    def _watch_loop(self, recursive: bool, stop: threading.Event) -> None:
        first = True
        while not (stop.is_set() or self._halt.is_set()):
            with self._cond:
                generation = self._generation
                targets = self._layout(recursive)
            until = _Until(lambda: stop.is_set() or self._halt.is_set()
                           or self._generation != generation)
            if not targets:
                self._mark_up(recursive)
                first = self._catch_up(first)
                while not until.is_set():
                    with self._cond:
                        self._cond.wait(_WAKE_S)
                continue
            try:
                notifier = self._notifier(targets, recursive, self._polling)
            except (OSError, RuntimeError) as e:
                self._trouble(e, targets, until)
                first = False  # the next watch must catch up with this gap
                continue
            self._mark_up(recursive)
            first = self._catch_up(first)
            try:
                self._pump(notifier, until)
            except (OSError, RuntimeError) as e:
                self._trouble(e, targets, until)
            finally:
                notifier.close()

    def _pump(self, notifier: Notifier, until: _Until) -> None:
        while not until.is_set():
            result = notifier.watch(GROUP_MS, STEP_MS, 0, until)
            if isinstance(result, str):
                continue  # "stop", "timeout" or "signal": `until` decides
            paths = {path for _, path in result}
            for change, path in result:
                if change == ADDED and os.path.isdir(path):
                    # what was put in a new folder before its watch existed was not seen
                    paths.update(self._files_below(path))
            self._feed(paths)
            if len(result) >= FLOOD:
                log.warning("file source: %d changes at once; rescanning in case the "
                            "kernel's event queue overflowed", len(result))
                self._rescan_at = self._clock()
            with self._cond:
                if any(self._moves_layout(p) for p in paths):
                    self._generation += 1
                    self._cond.notify_all()

    def _files_below(self, folder: str) -> list[str]:
        found: list[str] = []
        for root, _, names in os.walk(folder):
            found.extend(p for p in (os.path.join(root, n) for n in names)
                         if any(w.wants(p) for w in self._watches))
        return found

    def _layout(self, recursive: bool) -> list[str]:
        groups: dict[bool, set[str]] = {True: set(), False: set()}
        missing: set[str] = set()
        for w in self._watches:
            for g in w.globs:
                deep = g.depth is None or g.depth > 1
                if os.path.isdir(g.base):
                    groups[deep].add(g.base)
                    continue
                missing.add(g.base)
                parent = os.path.dirname(g.base)
                while parent != "/" and not os.path.isdir(parent):
                    parent = os.path.dirname(parent)
                groups[False].add(parent)
        self._missing = missing
        self._targets = groups[True] | groups[False]
        tree = groups[True]
        chosen = groups[recursive]
        if recursive:  # a folder inside another watched tree is already covered
            chosen = {t for t in tree if not any(t.startswith(o.rstrip("/") + "/")
                                                 for o in tree if o != t)}
        return sorted(chosen)

    def _moves_layout(self, path: str) -> bool:
        if path in self._targets:
            return True
        prefix = path.rstrip("/") + "/"
        return any(m == path or m.startswith(prefix) for m in self._missing)

    def _catch_up(self, first: bool) -> bool:
        # A watch (re)made after the start missed what changed while none was up.
        if not first:
            self.rescan("watch started")
        return False

    def _mark_up(self, recursive: bool) -> None:
        self._up.add(recursive)
        if len(self._up) == 2:
            self.ready.set()

    def _trouble(self, error: BaseException, targets: list[str], until: _Until) -> None:
        text = str(error)
        if _is_limit(error):
            if not self._polling:
                log.error("file source: the kernel's inotify limit is reached (%s); falling "
                          "back to polling every %d ms. Raise fs.inotify.max_user_watches "
                          "and fs.inotify.max_user_instances (sysctl) to watch with inotify "
                          "again", text, POLL_DELAY_MS)
            self._polling = True
        else:
            log.error("file source: watching %s failed: %s; trying again in 1 s",
                      ", ".join(targets), text)
            deadline = self._clock() + 1.0
            while not until.is_set() and self._clock() < deadline:
                with self._cond:
                    self._cond.wait(_WAKE_S)
        self._rescan_at = self._clock()


def _some(paths: list[str]) -> str:
    return ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")


def _is_limit(error: BaseException) -> bool:
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EMFILE):
        return True
    text = str(error).lower()
    return "limit" in text or "no space left" in text or "too many open files" in text


def _stat(path: str) -> _Stat | None:
    # Follow symlinks: a config file whose link is switched to a new target has changed.
    try:
        st = os.stat(path)
    except OSError:
        try:
            st = os.lstat(path)  # a dangling link still exists
        except OSError:
            return None
    if stat.S_ISDIR(st.st_mode):
        return None
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _change(before: _Stat | None, after: _Stat | None) -> str | None:
    if before is None:
        return None if after is None else "added"
    if after is None:
        return "deleted"
    return None if before == after else "modified"
