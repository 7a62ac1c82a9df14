"""The journal source against real journal files: entries written by systemd-journal-remote,
followed by the real `journalctl -f --directory`, with the cursor kept in a real store."""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from opsrun import journal_entries as je
from opsrun.event import Event
from opsrun.matcher import Matcher, trigger_keys
from opsrun.runbook import JournalTrigger, load_runbook
from opsrun.sources.journal import EMPTY, JournalSource, backlog
from opsrun.store import Store
from tests.helpers.cli import opsrun
from tests.helpers.files import write
from tests.helpers.journal import entry, needs_journal, write_entries
from tests.helpers.procs import alive
from tests.helpers.service import Service
from tests.helpers.wait import wait_for

KEY = "rb/journal/abc"


def trig(folder: Path, *, units: Sequence[str] = (), priority: int | None = None,
         match: str | None = None, fields: dict[str, Sequence[str]] | None = None,
         start: str = "end") -> JournalTrigger:
    return JournalTrigger(tuple(units), priority, match,
                          tuple((k, tuple(v)) for k, v in sorted((fields or {}).items())),
                          start, str(folder))


class Collect:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.lock = threading.Lock()
        self.fail = False

    def __call__(self, events: Sequence[Event]) -> None:
        if self.fail:
            raise OSError("the disk is full")
        with self.lock:
            self.events.extend(events)

    def messages(self) -> list[str]:
        with self.lock:
            return [e.data["message"] for e in self.events]


class Running:
    """A source in its own thread, stopped at the end of the test whatever happens."""

    def __init__(self, source: JournalSource, emit: Collect) -> None:
        self.source, self.emit = source, emit
        self.stop = threading.Event()
        self.error: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert source.ready.wait(30), "the journal source did not get ready"

    def _run(self) -> None:
        try:
            self.source.run(self.stop, self.emit)
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            self.error.append(e)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the journal source did not stop"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "state") as s:
        yield s


@pytest.fixture
def running() -> Iterator[list[Running]]:
    made: list[Running] = []
    yield made
    for r in made:
        r.close()


@pytest.fixture
def jdir(tmp_path: Path) -> Path:
    folder = tmp_path / "journal"
    write_entries(folder, [entry("before the start", priority=3)])
    return folder


def start(running: list[Running], trigger: JournalTrigger, store: Store, key: str = KEY,
          **kw: object) -> Running:
    r = Running(JournalSource(key, trigger, store, backoff_s=0.05, **kw),  # type: ignore[arg-type]
                Collect())
    running.append(r)
    return r


def wait_messages(r: Running, expected: list[str], timeout: float = 20) -> None:
    wait_for(lambda: len(r.emit.messages()) >= len(expected), timeout=timeout,
             message=lambda: f"got {r.emit.messages()}, expected {expected}")
    assert r.emit.messages() == expected


# ── the pure parts ──────────────────────────────────────────────────────────

def test_priorities_by_name_number_and_synonym() -> None:
    assert [je.parse_priority(v) for v in ("err", "error", "3", 3, "WARNING", "emerg", 7)] \
        == [3, 3, 3, 3, 4, 0, 7]
    with pytest.raises(ValueError, match="unknown priority 'eror' .did you mean 'err'"):
        je.parse_priority("eror")
    with pytest.raises(ValueError, match="out of range"):
        je.parse_priority(8)


def test_field_values_bytes_repeated_and_null() -> None:
    assert je.decode_value([104, 105]) == "hi"
    assert je.decode_value([99, 97, 102, 233]) == "caf\ufffd"
    assert je.decode_value(["a", [98]]) == ["a", "b"]
    assert je.decode_value(None) is None
    fields = je.decode_entry({"MESSAGE": None, "_PID": "12", "__REALTIME_TIMESTAMP":
                              "1700000000123456", "PRIORITY": "x"})
    data = je.event_fields(fields)
    assert data["message"] == "" and data["pid"] == 12 and data["priority"] is None
    assert data["timestamp"] == "2023-11-14T22:13:20.123456Z"


def test_conditions_all_must_hold() -> None:
    t = trig(Path("/j"), units=["web-*.service"], priority=3, match=r"boom (?P<code>\d+)",
             fields={"SYSLOG_IDENTIFIER": ["web", "api"]})
    data = {"unit": "web-1.service", "priority": 2, "message": "boom 7",
            "fields": {"SYSLOG_IDENTIFIER": "api"}}
    assert t.check(data) == {"code": "7"} and t.why_not(data) == []
    for change, reason in [({"unit": "db.service"}, "unit: 'db.service' is not web-*"),
                           ({"priority": 5}, "priority: 5 is less severe than err (3)"),
                           ({"message": "fine"}, "message: does not match"),
                           ({"fields": {"SYSLOG_IDENTIFIER": "db"}},
                            "fields.SYSLOG_IDENTIFIER: 'db' is not 'web' or 'api'")]:
        assert t.check({**data, **change}) is None
        (why,) = t.why_not({**data, **change})
        assert why.startswith(reason)


def test_the_trigger_key_follows_what_journalctl_is_asked(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", """\
        on:
          - journal: {unit: web, priority: err, match: 'x'}
        steps: [{run: "true"}]
        """)
    before = trigger_keys(load_runbook(tmp_path / "a.yaml"))
    write(tmp_path, "a.yaml", """\
        on:
          - journal: {unit: web.service, priority: 3, match: 'other (?P<g>y)'}
        steps: [{run: "echo ${{ event.g }} ${{ event.message }}"}]
        """)
    rb = load_runbook(tmp_path / "a.yaml")
    assert trigger_keys(rb) == before  # `match:` edited: the cursor stays
    (t,) = rb.triggers
    assert isinstance(t, JournalTrigger) and t.units == ("web.service",) and t.priority == 3


# ── against the real journalctl ─────────────────────────────────────────────

@needs_journal
def test_unit_priority_regex_and_field_matches(tmp_path: Path, jdir: Path, store: Store,
                                               running: list[Running]) -> None:
    by_unit = start(running, trig(jdir, units=["web.service"]), store, "k/unit")
    by_glob = start(running, trig(jdir, units=["api-*.service"]), store, "k/glob")
    by_prio = start(running, trig(jdir, priority=3), store, "k/prio")
    by_regex = start(running, trig(jdir, match=r"took (?P<ms>\d+)ms(?P<message> x)?"),
                     store, "k/regex")
    by_field = start(running, trig(jdir, fields={"SYSLOG_IDENTIFIER": ["sshd"],
                                                 "_PID": ["1", "7"]}), store, "k/field")
    write_entries(jdir, [
        entry("web up"),
        entry("api-2 crashed", unit="api-2.service", priority=2),
        entry("request took 250ms", unit="db.service", priority=4),
        entry("Accepted publickey", unit="ssh.service", SYSLOG_IDENTIFIER="sshd", _PID=7),
        entry("sshd of another pid", unit="ssh.service", SYSLOG_IDENTIFIER="sshd", _PID=8),
        entry("web down", priority=0),
    ])
    wait_messages(by_unit, ["web up", "web down"])
    wait_messages(by_glob, ["api-2 crashed"])
    wait_messages(by_prio, ["api-2 crashed", "web down"])
    wait_messages(by_regex, ["request took 250ms"])
    wait_messages(by_field, ["Accepted publickey"])
    (slow,) = by_regex.emit.events
    d = slow.data
    assert slow.source == "journal" and d["trigger"] == "k/regex" and d["ms"] == "250"
    assert d["message"] == "request took 250ms"  # a group named like a field is ignored
    assert (d["unit"], d["priority"], d["hostname"], d["pid"], d["identifier"]) == (
        "db.service", 4, "host-1", 4242, "db")
    assert d["timestamp"].endswith("Z") and d["cursor"].startswith("s=")
    assert d["fields"]["MESSAGE"] == "request took 250ms"
    assert slow.checkpoint is not None
    assert slow.checkpoint.journal_cursors == (("k/regex", d["cursor"]),)
    # The matcher agrees with the source on each event.
    assert json.loads(slow.to_json())["ms"] == "250"


@needs_journal
def test_the_cursor_is_kept_across_a_stop(tmp_path: Path, jdir: Path, store: Store,
                                          running: list[Running]) -> None:
    t = trig(jdir, units=["web.service"])
    first = start(running, t, store)
    assert store.get_journal_cursor(KEY) is not None  # from: end arms it at once
    write_entries(jdir, [entry(f"one {n}") for n in range(3)])
    wait_messages(first, ["one 0", "one 1", "one 2"])
    first.close()
    assert store.get_journal_cursor(KEY) == first.emit.events[-1].data["cursor"]
    # Written while nothing follows the journal, more than journalctl's 10 lines of tail.
    write_entries(jdir, [entry(f"down {n}") for n in range(15)])
    second = start(running, t, store)
    write_entries(jdir, [entry("after")])
    wait_messages(second, [f"down {n}" for n in range(15)] + ["after"])


@needs_journal
def test_a_journal_empty_at_the_first_start_loses_nothing_while_down(
        tmp_path: Path, store: Store, running: list[Running]) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    first = start(running, trig(folder), store)
    assert store.get_journal_cursor(KEY) == ""  # armed: everything in it will be new
    first.close()
    write_entries(folder, [entry("while down")])
    second = start(running, trig(folder), store)
    write_entries(folder, [entry("after")])
    wait_messages(second, ["while down", "after"])


@needs_journal
def test_from_start_reads_everything_once(tmp_path: Path, jdir: Path, store: Store,
                                          running: list[Running]) -> None:
    t = trig(jdir, start="start")
    first = start(running, t, store)
    wait_messages(first, ["before the start"])
    first.close()
    second = start(running, t, store)
    write_entries(jdir, [entry("new")])
    wait_messages(second, ["new"])


@needs_journal
def test_a_vanished_cursor_goes_on_from_the_oldest_entry_left(
        tmp_path: Path, jdir: Path, store: Store, running: list[Running],
        caplog: pytest.LogCaptureFixture) -> None:
    t = trig(jdir)
    first = start(running, t, store)
    write_entries(jdir, [entry("taken")])
    wait_messages(first, ["taken"])
    first.close()
    # Vacuumed away while down; a new file holds what came after.
    (jdir / "remote.journal").unlink()
    write_entries(jdir, [entry("later 1"), entry("later 2")], name="remote-2.journal")
    with caplog.at_level(logging.WARNING, logger="opsrun.sources"):
        second = start(running, t, store)
        wait_messages(second, ["later 1", "later 2"])
    assert any("kept cursor is no longer in the journal" in r.getMessage()
               for r in caplog.records)


@needs_journal
def test_a_cursor_journalctl_refuses_is_forgotten(tmp_path: Path, jdir: Path, store: Store,
                                                  running: list[Running],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    store.set_journal_cursor(KEY, "not a cursor")
    with caplog.at_level(logging.WARNING, logger="opsrun.sources"):
        r = start(running, trig(jdir), store)
        wait_for(lambda: store.get_journal_cursor(KEY) not in (None, "not a cursor"),
                 timeout=20)
    assert any("journalctl refused the kept cursor" in m for m in caplog.messages)
    write_entries(jdir, [entry("after")])
    wait_messages(r, ["after"])  # from the end: the entry written before is not taken


@needs_journal
def test_journalctl_that_exits_is_started_again(tmp_path: Path, jdir: Path, store: Store,
                                                running: list[Running],
                                                caplog: pytest.LogCaptureFixture) -> None:
    r = start(running, trig(jdir), store)
    write_entries(jdir, [entry("a")])
    wait_messages(r, ["a"])
    pid = r.source.child_pid
    assert pid is not None
    with caplog.at_level(logging.WARNING, logger="opsrun.sources"):
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: r.source.starts == 2 and r.source.child_pid not in (None, pid),
                 timeout=20)
    write_entries(jdir, [entry("b")])
    wait_messages(r, ["a", "b"])
    assert any("journalctl ended with exit code 137" in m for m in caplog.messages)


@needs_journal
def test_non_utf8_and_binary_messages(tmp_path: Path, jdir: Path, store: Store,
                                      running: list[Running]) -> None:
    r = start(running, trig(jdir, match=r"caf. (?P<rest>.+)"), store)
    write_entries(jdir, [entry(b"caf\xe9 \xff boom\x01"), entry("line\nbreak")])
    wait_messages(r, ["caf\ufffd \ufffd boom\x01"])
    (e,) = r.emit.events
    assert e.data["rest"] == "\ufffd boom\x01"
    e.to_json().encode("utf-8")  # storable as it is


@needs_journal
def test_emit_failing_stops_journalctl_and_keeps_the_cursor(
        tmp_path: Path, jdir: Path, store: Store, running: list[Running]) -> None:
    r = start(running, trig(jdir), store)
    kept = store.get_journal_cursor(KEY)
    r.emit.fail = True
    write_entries(jdir, [entry("not taken")])
    r.thread.join(20)
    assert not r.thread.is_alive() and isinstance(r.error[0], OSError)
    assert store.get_journal_cursor(KEY) == kept
    again = start(running, trig(jdir), store)
    wait_messages(again, ["not taken"])


def test_journalctl_missing_is_said_and_retried(tmp_path: Path, store: Store,
                                                running: list[Running],
                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="opsrun.sources"):
        r = start(running, trig(tmp_path), store, journalctl=str(tmp_path / "no-journalctl"))
        wait_for(lambda: sum("is journalctl installed?" in m for m in caplog.messages) >= 2,
                 timeout=20)
    r.close()
    assert r.error == [] and r.source.starts == 0


# ── validation and the service ──────────────────────────────────────────────

def test_validate_warns_without_journalctl(tmp_path: Path) -> None:
    write(tmp_path, "j.yaml", """\
        on:
          - journal: {unit: web, directory: /nonexistent/journal}
        steps: [{run: "true"}]
        """)
    bare = tmp_path / "bin"
    bare.mkdir()
    done = opsrun("validate", str(tmp_path / "j.yaml"), env={"PATH": str(bare)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "on[0].journal: journalctl is not installed on this machine" in done.stdout
    assert "on[0].journal.directory: there is no folder '/nonexistent/journal'" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


@needs_journal
def test_watch_takes_journal_entries_once_across_a_restart(
        tmp_path: Path, rbdir: Path, services: list[Service]) -> None:
    jdir = tmp_path / "journal"
    write_entries(jdir, [entry("Out of memory: old news", priority=3)])
    out = tmp_path / "out"
    write(rbdir, "oom.yaml", f"""\
        on:
          - journal:
              unit: web
              priority: err
              match: 'Out of memory: Killed process (?P<killed>\\d+) \\((?P<proc>[^)]+)\\)'
              directory: {jdir}
        steps:
          - run: echo "${{{{ event.proc }}}} ${{{{ event.killed }}}} ${{{{ event.unit }}}} $OPSRUN_EVENT_PRIORITY" >> {out}
        """)
    svc = Service(tmp_path, rbdir)
    services.append(svc)
    svc.start()

    def oom(n: int) -> dict[str, str | bytes | int]:
        return entry(f"Out of memory: Killed process {n} (worker-{n})", priority=3)

    write_entries(jdir, [oom(1), entry("Out of memory: Killed process 9 (x)", priority=6)])
    wait_for(lambda: out.exists() and len(out.read_text().splitlines()) == 1, timeout=30,
             message=svc.log)
    assert svc.stop() == 0
    write_entries(jdir, [oom(2), oom(3)])  # while the service is down
    svc2 = Service(tmp_path, rbdir)
    services.append(svc2)
    svc2.start()
    # The start-up report counted them before the source read them.
    [gap] = [r for r in svc2.audit() if r["kind"] == "daemon.gap"]
    assert [(j["runbook"], j["entries"], j["error"]) for j in gap["journals"]] == \
        [("oom", 2, None)]
    assert "oom: journal (web.service): 2 entries after the kept cursor to read" in svc2.log()
    wait_for(lambda: len(out.read_text().splitlines()) == 3, timeout=30, message=svc2.log)
    write_entries(jdir, [oom(4)])
    wait_for(lambda: len(out.read_text().splitlines()) == 4, timeout=30, message=svc2.log)
    assert svc2.stop() == 0
    assert out.read_text().splitlines() == [
        f"worker-{n} {n} web.service 3" for n in (1, 2, 3, 4)]
    keys = [r for r in svc2.audit() if r["kind"] == "run.queued"]
    assert len(keys) == 4


@needs_journal
def test_backlog_counts_the_entries_after_a_cursor_as_journalctl_filters_them(
        tmp_path: Path, jdir: Path) -> None:
    t = trig(jdir, priority=3)
    assert backlog(t, EMPTY) == (1, None)  # an empty journal's cursor: every entry
    [first] = [json.loads(line) for line in
               os.popen(f"journalctl --directory {jdir} -o json --merge").read().splitlines()]
    write_entries(jdir, [entry("a", priority=2), entry("b", priority=6), entry("c", priority=3)])
    assert backlog(t, first["__CURSOR"]) == (2, None)  # not the kept one, nor info "b"
    missing = backlog(trig(tmp_path / "nowhere"), "s=1")
    assert missing.entries == 0 and missing.error


def test_the_matcher_takes_journal_events_for_their_trigger_only(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", """\
        on:
          - journal: {unit: web, match: 'boom (?P<n>\\d+)'}
        steps: [{run: "true"}]
        """)
    rb = load_runbook(tmp_path / "a.yaml")
    (key,) = trigger_keys(rb)
    m = Matcher([rb])
    data = {"source": "journal", "id": "1", "time": "t", "unit": "web.service",
            "message": "boom 4", "priority": 6, "fields": {}}
    (match,) = m.match(Event("journal", {**data, "trigger": key}))
    assert match.fields == {"n": "4"}
    assert m.match(Event("journal", {**data, "trigger": "other"})) == []
    assert m.match(Event("journal", {**data, "trigger": key, "unit": "db.service"})) == []


def _journalctl_of(folder: Path) -> list[int]:
    """Live journalctl processes reading `folder`."""
    found = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"journalctl") and str(folder).encode() in argv and alive(pid):
            found.append(pid)
    return found


@needs_journal
def test_a_killed_service_leaves_no_journalctl_behind(tmp_path: Path, rbdir: Path,
                                                      services: list[Service]) -> None:
    jdir = tmp_path / "journal"
    write_entries(jdir, [entry("x")])
    write(rbdir, "j.yaml", f"""\
        on:
          - journal: {{directory: {jdir}}}
        steps: [{{run: "true"}}]
        """)
    svc = Service(tmp_path, rbdir)
    services.append(svc)
    svc.start()
    (child,) = wait_for(lambda: _journalctl_of(jdir), timeout=20)
    svc.kill()
    # journalctl -f ends when the reading end of its output closes (it polls for POLLHUP).
    wait_for(lambda: not alive(child), timeout=20)


def test_watch_without_journalctl_says_so_and_stays_up(tmp_path: Path, rbdir: Path,
                                                       services: list[Service]) -> None:
    write(rbdir, "j.yaml", f"""\
        on:
          - journal: {{unit: web, directory: {tmp_path}}}
        steps: [{{run: "true"}}]
        """)
    bare = tmp_path / "bin"
    bare.mkdir()
    svc = Service(tmp_path, rbdir, env={"PATH": str(bare)})
    services.append(svc)
    svc.start()
    wait_for(lambda: "is journalctl installed?" in svc.log(), timeout=20, message=svc.log)
    assert "journalctl is not installed on this machine" in svc.log()  # the runbook warning
    assert "Traceback" not in svc.log()
    assert svc.stop() == 0


def test_sources_lists_journal_triggers(tmp_path: Path) -> None:
    write(tmp_path, "j.yaml", """\
        on:
          - journal: {unit: [web, "api-*"], priority: warning, fields: {_PID: 1},
                      directory: /srv/journal}
        steps: [{run: "true"}]
        """)
    text = opsrun("sources", "-r", str(tmp_path))
    assert text.returncode == 0, text.stderr
    assert "Journal\n  j: journal   unit web.service or api-*  priority warning or more " \
           "severe  _PID = 1  from end  in /srv/journal" in text.stdout
    (row,) = json.loads(opsrun("sources", "-r", str(tmp_path), "--json").stdout)["triggers"]
    assert {k: row[k] for k in ("source", "units", "priority", "fields", "directory")} == {
        "source": "journal", "units": ["web.service", "api-*"], "priority": 4,
        "fields": {"_PID": ["1"]}, "directory": "/srv/journal"}
