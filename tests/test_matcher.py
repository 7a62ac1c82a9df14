"""The matcher: a table of event/trigger cases, trigger keys, and the index."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from opsrun import matcher as matcher_mod
from opsrun.criteria import parse_where
from opsrun.event import Event, from_object, new_event
from opsrun.matcher import Matcher, trigger_key, trigger_keys
from opsrun.runbook import (
    EventTrigger,
    FileTrigger,
    LogTrigger,
    Runbook,
    ScheduleTrigger,
    Trigger,
    load_runbooks,
)

ALL = ("added", "modified", "deleted")


def rb(name: str, *triggers: Trigger) -> Runbook:
    return Runbook(name=name, path=Path(f"/rb/{name}.yaml"), sha256="0" * 64, steps=(),
                   triggers=triggers)


def ft(*paths: str, events: tuple[str, ...] = ALL, ignore: tuple[str, ...] = ()) -> FileTrigger:
    return FileTrigger(tuple(paths), events, 0.05, ignore)


def lt(path: str, match: str | None = None) -> LogTrigger:
    return LogTrigger(path, match, "end")


def et(where: dict[str, Any]) -> EventTrigger:
    return EventTrigger(parse_where(where))


def fe(path: Any, change: str = "added") -> Event:
    return new_event("file", path=path, change=change)


def le(path: str, line: str) -> Event:
    return new_event("log", path=path, line=line, lineno=1)


def je(**data: Any) -> Event:
    return from_object(data)


HOME_GLOB = "~/in/*.txt"

# (trigger, event, matches, fields added)
CASES: list[tuple[str, Trigger, Event, bool, dict[str, Any]]] = [
    ("csv added", ft("/srv/drop/*.csv"), fe("/srv/drop/a.csv"), True, {}),
    ("other suffix", ft("/srv/drop/*.csv"), fe("/srv/drop/a.txt"), False, {}),
    ("star stays in its folder", ft("/srv/drop/*.csv"), fe("/srv/drop/sub/a.csv"), False, {}),
    ("double star deep", ft("/srv/**/*.csv"), fe("/srv/a/b/c.csv"), True, {}),
    ("double star zero folders", ft("/srv/**/*.csv"), fe("/srv/c.csv"), True, {}),
    ("double star at the end", ft("/srv/**"), fe("/srv/x/y"), True, {}),
    ("double star not the folder", ft("/srv/**"), fe("/srv"), False, {}),
    ("change not wanted", ft("/d/*", events=("added",)), fe("/d/x", "modified"), False, {}),
    ("deleted wanted", ft("/d/*", events=("deleted",)), fe("/d/x", "deleted"), True, {}),
    ("unknown change", ft("/d/*"), fe("/d/x", "renamed"), False, {}),
    ("ignore by name", ft("/d/*", ignore=("*.tmp",)), fe("/d/x.tmp"), False, {}),
    ("ignore other name", ft("/d/*", ignore=("*.tmp",)), fe("/d/x.csv"), True, {}),
    ("ignore a folder name", ft("/s/**", ignore=(".git",)), fe("/s/.git/config"), False, {}),
    ("ignore names below base only", ft("/tmp/s/*", ignore=("tmp",)), fe("/tmp/s/a"), True,
     {}),
    ("ignore a path glob", ft("/d/**", ignore=("/d/private/*",)), fe("/d/private/k"), False,
     {}),
    ("literal file", ft("/etc/app.conf"), fe("/etc/app.conf"), True, {}),
    ("literal is not a prefix", ft("/etc/app.conf"), fe("/etc/app.conf.bak"), False, {}),
    ("question mark", ft("/data/file?.log"), fe("/data/file1.log"), True, {}),
    ("question mark is one", ft("/data/file?.log"), fe("/data/file10.log"), False, {}),
    ("class", ft("/data/[0-9]*.csv"), fe("/data/7x.csv"), True, {}),
    ("class misses", ft("/data/[0-9]*.csv"), fe("/data/x7.csv"), False, {}),
    ("negated class", ft("/data/[!.]*"), fe("/data/.hidden"), False, {}),
    ("star matches dot files", ft("/data/*"), fe("/data/.env"), True, {}),
    ("tilde is home", ft(HOME_GLOB), fe("HOME/in/a.txt"), True, {}),
    ("no path", ft("/d/*"), new_event("file", change="added"), False, {}),
    ("relative path in event", ft("/d/*"), fe("d/x"), False, {}),
    ("log regex groups", lt("/var/log/app.log", r"ERROR (?P<code>\d+)"),
     le("/var/log/app.log", "ERROR 42"), True, {"code": "42"}),
    ("log regex misses", lt("/var/log/app.log", r"ERROR (?P<code>\d+)"),
     le("/var/log/app.log", "INFO ok"), False, {}),
    ("log regex searches", lt("/l/a.log", r"ERROR (?P<code>\d+)"), le("/l/a.log", "x ERROR 7 y"),
     True, {"code": "7"}),
    ("log without match: every line", lt("/l/a.log"), le("/l/a.log", "anything"), True, {}),
    ("log optional group", lt("/l/a.log", r"fail(?: code=(?P<code>\d+))?"),
     le("/l/a.log", "fail"), True, {"code": None}),
    ("log glob", lt("/var/log/*.log", "x"), le("/var/log/b.log", "x"), True, {}),
    ("log other file", lt("/var/log/app.log", "x"), le("/var/log/other.log", "x"), False, {}),
    ("event equality", et({"type": "alert"}), je(type="alert"), True, {}),
    ("equality is exact", et({"type": "alert"}), je(type="Alert"), False, {}),
    ("in", et({"severity": {"in": ["critical", "high"]}}), je(severity="high"), True, {}),
    ("in misses", et({"severity": {"in": ["critical", "high"]}}), je(severity="low"), False,
     {}),
    ("not_in", et({"env": {"not_in": ["dev"]}}), je(env="prod"), True, {}),
    ("ne", et({"env": {"ne": "dev"}}), je(env="dev"), False, {}),
    ("dotted regex", et({"labels.host": {"regex": r"^web-\d+$"}}),
     je(labels={"host": "web-12"}), True, {}),
    ("dotted regex misses", et({"labels.host": {"regex": r"^web-\d+$"}}),
     je(labels={"host": "db-1"}), False, {}),
    ("glob operator", et({"file": {"glob": "*.csv"}}), je(file="a.csv"), True, {}),
    ("contains in a list", et({"tags": {"contains": "x"}}), je(tags=["y", "x"]), True, {}),
    ("contains in a text", et({"msg": {"contains": "disk"}}), je(msg="disk full"), True, {}),
    ("gt", et({"load": {"gt": 2}}), je(load=2.5), True, {}),
    ("gte equal", et({"load": {"gte": 2}}), je(load=2), True, {}),
    ("lt on dates as text", et({"at": {"lt": "2024-06-01"}}), je(at="2024-05-31"), True, {}),
    ("lte misses", et({"load": {"lte": 1}}), je(load=3), False, {}),
    ("gt does not compare text with numbers", et({"load": {"gt": 1}}), je(load="5"), False,
     {}),
    ("exists", et({"who": {"exists": True}}), je(other=1), False, {}),
    ("exists false", et({"who": {"exists": False}}), je(other=1), True, {}),
    ("missing field fails", et({"type": "alert"}), je(kind="alert"), False, {}),
    ("one equals one point zero", et({"code": 1}), je(code=1.0), True, {}),
    ("true is not one", et({"code": 1}), je(code=True), False, {}),
    ("text is not a number", et({"code": 1}), je(code="1"), False, {}),
    ("list index", et({"items.0.name": "a"}), je(items=[{"name": "a"}]), True, {}),
    ("empty where: every JSON event", et({}), je(anything=1), True, {}),
    ("object equality", et({"meta": {"eq": {"a": 1}}}), je(meta={"a": 1}), True, {}),
    ("two conditions", et({"type": "alert", "sev": {"gte": 3}}), je(type="alert", sev=2),
     False, {}),
    ("a JSON event does not start a file trigger", ft("/d/*"),
     from_object({"path": "/d/x", "change": "added"}), False, {}),
    ("a manual event starts nothing", et({}), Event("manual", {"source": "manual"}), False, {}),
    ("a file event does not start an event trigger", et({}), fe("/d/x"), False, {}),
]


@pytest.mark.parametrize(("trigger", "event", "expected", "fields"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_table(trigger: Trigger, event: Event, expected: bool, fields: dict[str, Any]) -> None:
    if isinstance(event.data.get("path"), str) and event.data["path"].startswith("HOME/"):
        event = Event(event.source, {**event.data,
                                     "path": os.environ["HOME"] + event.data["path"][4:]})
    matches = Matcher([rb("one", trigger)]).match(event)
    assert bool(matches) is expected
    if expected:
        (m,) = matches
        assert m.trigger is trigger
        assert dict(m.fields) == fields


def test_at_least_forty_cases() -> None:
    assert len(CASES) >= 40


def test_schedule_events_name_their_trigger() -> None:
    daily = rb("daily", ScheduleTrigger("0 3 * * *", "UTC", "none", 0.0))
    m = Matcher([daily])
    key = trigger_key(daily, 0)
    assert [x.runbook.name for x in m.match(new_event("schedule", trigger=key))] == ["daily"]
    assert m.match(new_event("schedule")) == []
    assert m.match(new_event("schedule", trigger="gone/schedule/000000000000")) == []


def test_a_keyed_event_starts_its_trigger_only() -> None:
    a, b = rb("a", ft("/d/*.csv")), rb("b", ft("/d/**"))
    m = Matcher([a, b])
    assert [x.runbook.name for x in m.match(fe("/d/x.csv"))] == ["a", "b"]
    keyed = new_event("file", trigger=trigger_key(b, 0), path="/d/x.csv", change="added")
    assert [x.runbook.name for x in m.match(keyed)] == ["b"]
    # the trigger's own conditions still hold for a keyed event
    wrong = new_event("file", trigger=trigger_key(a, 0), path="/d/x.txt", change="added")
    assert m.match(wrong) == []


def test_one_run_per_runbook_and_runbook_order() -> None:
    first = rb("first", et({"type": "x"}), et({}))
    second = rb("second", et({"type": {"in": ["x"]}}))
    matches = Matcher([second, first]).match(je(type="x"))
    assert [(x.runbook.name, x.trigger_key) for x in matches] == [
        ("second", trigger_key(second, 0)), ("first", trigger_key(first, 0))]


def test_json_payload_cannot_pick_a_trigger() -> None:
    a, b = rb("a", et({"type": "a"})), rb("b", et({"type": "b"}))
    evil = je(type="b", trigger=trigger_key(a, 0))
    assert [x.runbook.name for x in Matcher([a, b]).match(evil)] == ["b"]


def test_event_for_run_adds_the_fields() -> None:
    t = lt("/l/a.log", r"(?P<proc>\w+) killed")
    (m,) = Matcher([rb("oom", t)]).match(le("/l/a.log", "gunicorn killed"))
    data = m.event_for_run(le("/l/a.log", "gunicorn killed")).data
    assert data["proc"] == "gunicorn" and data["line"] == "gunicorn killed"


def test_trigger_keys() -> None:
    log = lt("/var/log/app.log", "a")
    base = rb("web", ScheduleTrigger("0 3 * * *", "UTC", "none", 0.0), log, log)
    keys = trigger_keys(base)
    assert keys[0].startswith("web/schedule/") and keys[1].startswith("web/log/")
    assert keys[2] == keys[1] + "~2"  # identical triggers in one runbook
    reordered = rb("web", log, ScheduleTrigger("0 3 * * *", "UTC", "last", 5.0))
    assert trigger_keys(reordered)[1] == keys[0]  # position and catch_up/jitter do not count
    assert trigger_keys(reordered)[0] == keys[1]
    new_regex = rb("web", lt("/var/log/app.log", "b"))
    assert trigger_keys(new_regex)[0] == keys[1]  # a new `match:` keeps the log position
    assert trigger_keys(rb("web", ScheduleTrigger("0 4 * * *", "UTC", "none", 0.0)))[0] \
        != keys[0]
    assert trigger_keys(rb("api", log))[0] != keys[1]


def test_lookup_and_bound() -> None:
    a = rb("a", ft("/d/*"), et({"x": 1}))
    m = Matcher([a])
    assert [b.trigger.kind for b in m.bound()] == ["file", "event"]
    assert [b.key for b in m.bound("file")] == [trigger_key(a, 0)]
    found = m.lookup(trigger_key(a, 1))
    assert found is not None and found.runbook is a and found.index == 1
    assert m.lookup("nope") is None


def many(n: int) -> list[Runbook]:
    books = [rb(f"alert-{i}", et({"type": "alert", "service": f"svc-{i}"})) for i in range(n)]
    books += [rb(f"drop-{i}", ft(f"/srv/drop-{i}/*.csv")) for i in range(n)]
    books.append(rb("catch-all", et({"severity": {"gte": 9}})))  # nothing literal to index
    return books


def test_the_index_checks_only_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    m = Matcher(many(1000))
    checked: list[str] = []
    real = matcher_mod._check

    def spy(trigger: Trigger, data: Any) -> Any:
        checked.append(trigger.kind)
        return real(trigger, data)

    monkeypatch.setattr(matcher_mod, "_check", spy)
    assert m.match(je(type="alert", service="svc-none")) == []
    assert checked == ["event"]  # only the trigger with nothing literal to index by
    checked.clear()
    assert [x.runbook.name for x in m.match(je(type="alert", service="svc-7"))] == ["alert-7"]
    assert checked == ["event", "event"]
    checked.clear()
    assert [x.runbook.name for x in m.match(fe("/srv/drop-9/a.csv"))] == ["drop-9"]
    assert m.match(fe("/elsewhere/a.csv")) == []
    assert checked == ["file"]


def test_the_index_keeps_json_equality() -> None:
    m = Matcher([rb("one", et({"code": 1})), rb("yes", et({"flag": True})),
                 rb("none", et({"value": None}))])
    assert [x.runbook.name for x in m.match(je(code=1.0))] == ["one"]
    assert m.match(je(code=True)) == []
    assert [x.runbook.name for x in m.match(je(flag=True))] == ["yes"]
    assert m.match(je(flag=1)) == []
    assert [x.runbook.name for x in m.match(je(value=None))] == ["none"]
    assert m.match(je(code=[1])) == []  # an unhashable value is no index key, and no match


def test_runbooks_from_files(tmp_path: Path) -> None:
    (tmp_path / "oom.yaml").write_text(
        "on:\n"
        "  - log:\n"
        "      path: /var/log/kern.log\n"
        "      match: 'Killed process \\d+ \\((?P<proc>[\\w-]+)\\)'\n"
        "  - event:\n"
        "      where: {type: alert, labels.host: {regex: '^web-'}}\n"
        "steps:\n"
        "  - run: echo ${{ event.proc }}\n")
    books, problems = load_runbooks([tmp_path])
    assert problems == []
    m = Matcher(books)
    (hit,) = m.match(le("/var/log/kern.log", "Out of memory: Killed process 12 (gunicorn)"))
    assert hit.fields == {"proc": "gunicorn"} and hit.runbook.name == "oom"
    assert m.match(je(type="alert", labels={"host": "web-1"}))[0].trigger.kind == "event"
