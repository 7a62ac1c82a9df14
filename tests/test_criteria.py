"""`where:` criteria: one table of events and criteria, and the errors for bad criteria."""
from __future__ import annotations

from typing import Any

import pytest

from opsrun.criteria import (
    Condition,
    Criteria,
    CriteriaError,
    holds,
    lookup,
    matches,
    parse_where,
    same,
    why_not,
)

EVENT: dict[str, Any] = {
    "source": "json",
    "type": "alert",
    "severity": "critical",
    "count": 7,
    "ratio": 0.5,
    "one": 1,
    "one_float": 1.0,
    "one_text": "1",
    "flag": True,
    "off": False,
    "nothing": None,
    "empty": "",
    "time": "2024-03-10T12:00:00Z",
    "day": "2024-03-10",
    "labels": {"host": "web-12", "env": "prod", "team": {"name": "ops"}},
    "tags": ["db", "urgent", 3],
    "items": [{"name": "a", "size": 10}, {"name": "b", "size": 20}],
    "path": "/srv/drop/report 2024.csv",
    "message": "Out of memory: Killed process 4242 (gunicorn)",
    "dotted.key": "literal",
}

CASES: list[tuple[str, dict[str, Any], bool]] = [
    # plain values mean equality
    ("plain text equal", {"type": "alert"}, True),
    ("plain text differs", {"type": "page"}, False),
    ("several plain values, all hold", {"type": "alert", "severity": "critical"}, True),
    ("several plain values, one fails", {"type": "alert", "severity": "low"}, False),
    ("no criteria match everything", {}, True),
    # eq / ne and JSON type strictness
    ("eq number", {"count": {"eq": 7}}, True),
    ("1 == 1.0", {"one": 1.0}, True),
    ("1.0 == 1", {"one_float": {"eq": 1}}, True),
    ("true is not 1", {"flag": 1}, False),
    ("1 is not true", {"one": True}, False),
    ("false is not 0", {"off": 0}, False),
    ("'1' is not 1", {"one_text": 1}, False),
    ("1 is not '1'", {"one": "1"}, False),
    ("null equals null", {"nothing": None}, True),
    ("null is not empty text", {"nothing": ""}, False),
    ("empty text equals empty text", {"empty": ""}, True),
    ("ne holds", {"severity": {"ne": "low"}}, True),
    ("ne fails", {"severity": {"ne": "critical"}}, False),
    ("ne on a missing field fails", {"missing": {"ne": "x"}}, False),
    ("ne across types holds", {"one_text": {"ne": 1}}, True),
    ("eq whole mapping", {"labels.team": {"eq": {"name": "ops"}}}, True),
    ("eq whole list", {"tags": ["db", "urgent", 3]}, True),
    ("eq list order matters", {"tags": ["urgent", "db", 3]}, False),
    # in / not_in
    ("in", {"severity": {"in": ["critical", "high"]}}, True),
    ("in fails", {"severity": {"in": ["low", "high"]}}, False),
    ("in is type strict", {"one": {"in": ["1", True]}}, False),
    ("in with 1.0", {"one": {"in": [1.0]}}, True),
    ("not_in", {"severity": {"not_in": ["low"]}}, True),
    ("not_in fails", {"severity": {"not_in": ["critical"]}}, False),
    ("not_in on a missing field fails", {"missing": {"not_in": ["x"]}}, False),
    # regex (search, not full match) and glob (whole value)
    ("regex", {"labels.host": {"regex": r"^web-\d+$"}}, True),
    ("regex searches", {"message": {"regex": r"Killed process \d+"}}, True),
    ("regex fails", {"labels.host": {"regex": r"^db-"}}, False),
    ("regex on a number fails", {"count": {"regex": "7"}}, False),
    ("glob", {"path": {"glob": "/srv/drop/*.csv"}}, True),
    ("glob is case sensitive", {"path": {"glob": "/srv/drop/*.CSV"}}, False),
    ("glob must match the whole value", {"path": {"glob": "drop"}}, False),
    ("glob with ?", {"labels.env": {"glob": "pro?"}}, True),
    # contains
    ("contains text", {"message": {"contains": "gunicorn"}}, True),
    ("contains text fails", {"message": {"contains": "nginx"}}, False),
    ("contains list item", {"tags": {"contains": "urgent"}}, True),
    ("contains list number", {"tags": {"contains": 3}}, True),
    ("contains list is type strict", {"tags": {"contains": "3"}}, False),
    ("contains mapping key", {"labels": {"contains": "host"}}, True),
    ("contains on a number fails", {"count": {"contains": 7}}, False),
    # gt / gte / lt / lte
    ("gt", {"count": {"gt": 5}}, True),
    ("gt equal fails", {"count": {"gt": 7}}, False),
    ("gte equal", {"count": {"gte": 7}}, True),
    ("lt float", {"ratio": {"lt": 0.75}}, True),
    ("lte int and float", {"one": {"lte": 1.0}}, True),
    ("range with two operators", {"count": {"gt": 1, "lt": 10}}, True),
    ("range with two operators fails", {"count": {"gt": 1, "lt": 5}}, False),
    ("gt text against number fails", {"one_text": {"gt": 0}}, False),
    ("gt number against text fails", {"count": {"gt": "5"}}, False),
    ("gt on a boolean fails", {"flag": {"gt": 0}}, False),
    ("ISO time compares", {"time": {"gte": "2024-03-01T00:00:00Z"}}, True),
    ("ISO time before", {"time": {"lt": "2024-03-10T11:59:59Z"}}, False),
    ("ISO date range", {"day": {"gte": "2024-03-01", "lt": "2024-04-01"}}, True),
    ("gt on a missing field fails", {"missing": {"gt": 0}}, False),
    # exists
    ("exists true", {"labels.host": {"exists": True}}, True),
    ("exists true on null", {"nothing": {"exists": True}}, True),
    ("exists false on missing", {"ticket": {"exists": False}}, True),
    ("exists false on present", {"type": {"exists": False}}, False),
    ("exists true on missing", {"ticket": {"exists": True}}, False),
    # missing fields and dotted paths
    ("missing field fails equality", {"missing": "x"}, False),
    ("missing field fails null equality", {"missing": None}, False),
    ("nested dotted path", {"labels.team.name": "ops"}, True),
    ("nested path through a text fails", {"type.name": "x"}, False),
    ("nested path missing in the middle", {"labels.nope.name": {"exists": False}}, True),
    ("list index", {"tags.0": "db"}, True),
    ("list index out of range", {"tags.9": {"exists": False}}, True),
    ("list index then field", {"items.1.size": {"gt": 15}}, True),
    ("list index must be a number", {"items.first.size": {"exists": True}}, False),
    ("negative index is not an index", {"tags.-1": {"exists": True}}, False),
    ("a key with a dot cannot be addressed", {"dotted.key": {"exists": True}}, False),
]


@pytest.mark.parametrize("criteria, expected", [(c, e) for _, c, e in CASES],
                         ids=[name for name, _, _ in CASES])
def test_criteria_table(criteria: dict[str, Any], expected: bool) -> None:
    assert matches(parse_where(criteria), EVENT) is expected


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 40
    ops = {op for _, c, _ in CASES for spec in c.values() if isinstance(spec, dict)
           for op in spec}
    assert {"eq", "ne", "in", "not_in", "regex", "glob", "contains", "gt", "gte", "lt", "lte",
            "exists"} <= ops


def test_parse_where() -> None:
    c = parse_where({"type": "alert", "labels.host": {"regex": "^web", "ne": "web-0"}})
    assert [(x.path, x.op, x.value) for x in c.conditions] == [
        (("type",), "eq", "alert"),
        (("labels", "host"), "regex", "^web"),
        (("labels", "host"), "ne", "web-0"),
    ]
    assert c.conditions[1].pattern is not None and c.conditions[1].field == "labels.host"


def test_literal_equalities_index_only_scalars() -> None:
    c = parse_where({"type": "alert", "count": 3, "tags": ["a"], "labels.env": {"eq": "prod"},
                     "severity": {"in": ["high"]}})
    assert c.literal_equalities() == {"type": "alert", "count": 3, "labels.env": "prod"}


@pytest.mark.parametrize("where, key, words", [
    ({"severity": {"inn": ["x"]}}, ("severity", "inn"),
     "unknown operator 'inn' (did you mean 'in'?)"),
    ({"severity": {"equals": "x"}}, ("severity", "equals"), "operators are eq, ne, in"),
    ({"severity": {"in": "critical"}}, ("severity", "in"), "`in` takes a list, like in: [a, b]"),
    ({"severity": {"not_in": None}}, ("severity", "not_in"), "`not_in` takes a list"),
    ({"host": {"regex": "^web-(\\d+$"}}, ("host", "regex"),
     "bad regular expression `^web-(\\d+$`"),
    ({"host": {"regex": 5}}, ("host", "regex"), "`regex` takes a text pattern"),
    ({"host": {"glob": ["a"]}}, ("host", "glob"), "`glob` takes a text pattern"),
    ({"ticket": {"exists": "no"}}, ("ticket", "exists"), "`exists` takes true or false"),
    ({"count": {"gt": [1]}}, ("count", "gt"), "not a list"),
    ({"count": {"lte": True}}, ("count", "lte"), "not true or false"),
    ({"count": {"gte": None}}, ("count", "gte"), "not nothing (null)"),
    ({"count": {"lt": {"a": 1}}}, ("count", "lt"), "not a mapping"),
    ({"count": {}}, ("count",), "no operator given for 'count'"),
    ({"labels..host": 1}, ("labels..host",), "is not a field path"),
    ({".host": 1}, (".host",), "is not a field path"),
    ({"": 1}, ("",), "is not a field path"),
])
def test_bad_criteria(where: dict[str, Any], key: tuple[str, ...], words: str) -> None:
    with pytest.raises(CriteriaError) as exc:
        parse_where(where)
    assert exc.value.key == key
    assert words in exc.value.message


def test_lookup() -> None:
    assert lookup(EVENT, ("labels", "team", "name")) == "ops"
    assert lookup(EVENT, ("items", "0", "name")) == "a"
    assert lookup(EVENT, ("nothing",)) is None
    assert lookup(EVENT, ("nope",)) is not None  # the missing marker, not None


def test_holds_single_condition() -> None:
    assert holds(Condition(("count",), "gte", 7), EVENT)
    assert not holds(Condition(("count",), "gt", 7), EVENT)


@pytest.mark.parametrize("a, b, equal", [
    (1, 1.0, True), (True, 1, False), (False, 0, False), ("1", 1, False), (None, None, True),
    ([1, [2]], [1.0, [2.0]], True), ({"a": 1}, {"a": 1.0}, True), ({"a": 1}, {"b": 1}, False),
    ([True], [1], False), ("a", "a", True), (0.1 + 0.2, 0.3, False),
])
def test_same(a: Any, b: Any, equal: bool) -> None:
    assert same(a, b) is equal
    assert same(b, a) is equal


def test_criteria_is_pure() -> None:
    event = {"a": [1, 2], "b": {"c": 1}}
    c = Criteria(parse_where({"a": {"contains": 1}, "b.c": 1}).conditions)
    assert matches(c, event) and matches(c, event)
    assert event == {"a": [1, 2], "b": {"c": 1}}


# ── any, all, not; contains by a subset of an item's fields ─────────────────

ALERT = {"type": "alert", "env": "prod", "labels": {"team": "web", "severity": "warning"},
         "alerts": [{"labels": {"alertname": "DiskFull", "severity": "warning"},
                     "status": "firing", "fingerprint": "a1"},
                    {"labels": {"alertname": "Down", "severity": "critical"},
                     "status": "resolved", "fingerprint": "b2"}]}


@pytest.mark.parametrize("where, expected", [
    ({"any": [{"labels.severity": "critical"}, {"labels.team": "web"}]}, True),
    ({"any": [{"labels.severity": "critical"}, {"labels.team": "db"}]}, False),
    ({"all": [{"type": "alert"}, {"env": {"in": ["prod", "staging"]}}]}, True),
    ({"all": [{"type": "alert"}, {"env": "staging"}]}, False),
    ({"not": {"env": "staging"}}, True),
    ({"not": {"env": "prod", "type": "alert"}}, False),  # not (both hold)
    ({"not": [{"env": "staging"}, {"labels.team": "web"}]}, False),  # neither may hold
    ({"type": "alert", "any": [{"not": {"env": "prod"}}, {"labels.team": "web"}]}, True),
    # an object of the list meets every condition given: extra fields do not matter
    ({"alerts": {"contains": {"labels.severity": "critical"}}}, True),
    ({"alerts": {"contains": {"labels.severity": "critical", "status": "firing"}}}, False),
    ({"alerts": {"contains": {"labels.alertname": {"regex": "^Disk"},
                              "status": "firing"}}}, True),
    ({"labels": {"contains": {"team": "web"}}}, False),  # not a list
])
def test_combinators_and_contains_an_object(where: dict[str, Any], expected: bool) -> None:
    assert matches(parse_where(where), ALERT) is expected


def test_why_not_names_each_failed_condition_and_the_value() -> None:
    c = parse_where({"type": "alert", "labels.severity": {"in": ["critical"]}, "host": "x",
                     "any": [{"env": "staging"}, {"labels.team": "db"}],
                     "not": {"labels.team": "web"}})
    assert why_not(c, ALERT) == [
        'labels.severity: expected one of ["critical"], found "warning"',
        "host: missing",
        'any: none of its 2 alternatives holds (env: expected "staging", found "prod"; or '
        'labels.team: expected "db", found "web")',
        'not: the event meets {labels.team eq "web"}',
    ]
    assert why_not(parse_where({"type": "alert"}), ALERT) == []


def test_literal_equalities_leave_the_groups_out() -> None:
    c = parse_where({"type": "alert", "any": [{"env": "prod"}], "not": {"x": 1}})
    assert c.literal_equalities() == {"type": "alert"}


@pytest.mark.parametrize("where, key, at_key, words", [
    ({"any": {"a": 1}}, ("any",), False, "`any` takes a list of mappings"),
    ({"all": []}, ("all",), False, "`all` takes a list of mappings"),
    ({"any": [{"x": {"nope": 1}}]}, ("any", 0, "x", "nope"), True, "unknown operator 'nope'"),
    ({"not": [1]}, ("not", 0), False, "`not` takes a mapping of conditions"),
    ({"alerts": {"contains": {}}}, ("alerts", "contains"), True,
     "`contains` with a mapping needs the fields"),
    ({"alerts": {"contains": {"s": {"in": 1}}}}, ("alerts", "contains", "s", "in"), True,
     "`in` takes a list"),
])
def test_bad_groups(where: dict[str, Any], key: tuple[object, ...], at_key: bool,
                    words: str) -> None:
    with pytest.raises(CriteriaError) as exc:
        parse_where(where)
    assert (exc.value.key, exc.value.at_key) == (key, at_key)
    assert words in exc.value.message
