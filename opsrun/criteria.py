"""`where:` criteria on events: dotted paths, operators, pure functions.

A field that is missing fails every operator except `exists: false`: a runbook that acts
on production should not fire on an event that lacks what it tests. Numbers compare with
numbers and text with text (so ISO dates order correctly); booleans are not numbers.

Conditions combine: every entry of a mapping must hold; `any: [{…}, {…}]` holds when one
of its mappings does, `all: [{…}, …]` when each does, and `not: {…}` when its mapping does
not (so `any`, `all` and `not` are not field names at that level). `contains` with a
mapping looks for an object in a list that meets those conditions, by a subset of its
fields: `alerts: {contains: {labels.severity: critical}}`.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Union

OPERATORS = ("eq", "ne", "in", "not_in", "regex", "glob", "contains",
             "gt", "gte", "lt", "lte", "exists")
COMBINATORS = ("any", "all", "not")
_MISSING = object()

Key = tuple[Union[str, int], ...]


class CriteriaError(ValueError):
    """A criterion that cannot work; `key` is the path within `where:` to what is at fault,
    `at_key` whether that is a key (an operator) rather than a value."""

    def __init__(self, message: str, key: Key = (), at_key: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.key = key
        self.at_key = at_key


class Condition(NamedTuple):
    path: tuple[str, ...]
    op: str
    value: Any
    pattern: re.Pattern[str] | None = None
    within: Criteria | None = None  # `contains` with a mapping: what an item must meet

    @property
    def field(self) -> str:
        return ".".join(self.path)


class Criteria(NamedTuple):
    conditions: tuple[Condition, ...] = ()
    any_of: tuple[Criteria, ...] = ()
    all_of: tuple[Criteria, ...] = ()
    none_of: tuple[Criteria, ...] = ()  # `not:`

    def literal_equalities(self) -> dict[str, Any]:
        """Fields the event must equal exactly (hashable values only): the matcher's index.

        Only the plain conditions at the top: those inside any/not need not hold.
        """
        return {c.field: c.value for c in self.conditions
                if c.op == "eq" and _hashable_scalar(c.value)}


def _hashable_scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None


def parse_where(where: Mapping[str, Any]) -> Criteria:
    """Build Criteria from a `where:` mapping; raise CriteriaError on the first bad entry."""
    conditions: list[Condition] = []
    groups: dict[str, list[Criteria]] = {name: [] for name in COMBINATORS}
    for key, spec in where.items():
        if key in COMBINATORS:
            groups[key].extend(_group(key, spec))
            continue
        path = tuple(key.split("."))
        if not key or any(not part for part in path):
            raise CriteriaError(f"{key!r} is not a field path; write names joined by dots, "
                                "like labels.host", (key,))
        if isinstance(spec, Mapping):
            if not spec:
                raise CriteriaError(f"no operator given for {key!r}; use one of "
                                    + ", ".join(OPERATORS), (key,))
            for op, value in spec.items():
                conditions.append(_condition(path, key, op, value))
        else:
            conditions.append(_condition(path, key, "eq", spec))
    return Criteria(tuple(conditions), tuple(groups["any"]), tuple(groups["all"]),
                    tuple(groups["not"]))


def _group(name: str, spec: Any) -> list[Criteria]:
    """The mappings of `any:`/`all:` (a list of them) or `not:` (one, or a list)."""
    items = [spec] if name == "not" and isinstance(spec, Mapping) else spec
    shape = "a mapping of conditions, or a list of them" if name == "not" else \
        "a list of mappings of conditions, like any: [{severity: critical}, {env: prod}]"
    if not isinstance(items, list) or not items:
        raise CriteriaError(f"`{name}` takes {shape}", (name,))
    out = []
    for i, item in enumerate(items):
        at: Key = (name,) if isinstance(spec, Mapping) else (name, i)
        if not isinstance(item, Mapping) or not item:
            raise CriteriaError(f"`{name}` takes {shape}", at)
        try:
            out.append(parse_where(item))
        except CriteriaError as e:
            raise CriteriaError(e.message, (*at, *e.key), e.at_key) from None
    return out


def _condition(path: tuple[str, ...], key: str, op: str, value: Any) -> Condition:
    if op not in OPERATORS:
        from opsrun.suggest import did_you_mean

        raise CriteriaError(f"unknown operator {op!r}{did_you_mean(op, OPERATORS)}; "
                            f"operators are {', '.join(OPERATORS)}", (key, op), at_key=True)
    where: Key = (key, op)
    if op == "contains" and isinstance(value, Mapping):
        if not value:
            raise CriteriaError("`contains` with a mapping needs the fields an item must "
                                "have, like contains: {labels.severity: critical}", where,
                                at_key=True)
        try:
            return Condition(path, op, value, within=parse_where(value))
        except CriteriaError as e:
            raise CriteriaError(e.message, (*where, *e.key), e.at_key) from None
    if op in ("in", "not_in"):
        if not isinstance(value, list):
            raise CriteriaError(f"`{op}` takes a list, like {op}: [a, b]", where, at_key=True)
    elif op in ("regex", "glob"):
        if not isinstance(value, str):
            raise CriteriaError(f"`{op}` takes a text pattern", where, at_key=True)
        if op == "regex":
            try:
                return Condition(path, op, value, re.compile(value))
            except re.error as e:
                raise CriteriaError(f"bad regular expression `{value}`: {e}", where,
                                    at_key=True) from None
    elif op == "exists":
        if not isinstance(value, bool):
            raise CriteriaError("`exists` takes true or false", where, at_key=True)
    elif op in ("gt", "gte", "lt", "lte"):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            kind = {list: "a list", dict: "a mapping", bool: "true or false"}.get(
                type(value), "nothing (null)" if value is None else type(value).__name__)
            raise CriteriaError(f"`{op}` compares with a number or a text, not {kind}", where, at_key=True)
    elif isinstance(value, Mapping) and op in ("eq", "ne"):
        pass  # comparing a whole object is allowed
    return Condition(path, op, value)


def lookup(event: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """The value at a dotted path, or _MISSING; list items are addressed by number."""
    value: Any = event
    for part in path:
        if isinstance(value, Mapping):
            if part not in value:
                return _MISSING
            value = value[part]
        elif isinstance(value, list) and part.isascii() and part.isdigit() \
                and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def matches(criteria: Criteria, event: Mapping[str, Any]) -> bool:
    """Whether every condition (and each any/all/not group) holds for the event."""
    return (all(holds(c, event) for c in criteria.conditions)
            and all(matches(g, event) for g in criteria.all_of)
            and (not criteria.any_of or any(matches(g, event) for g in criteria.any_of))
            and not any(matches(g, event) for g in criteria.none_of))


def why_not(criteria: Criteria, event: Mapping[str, Any]) -> list[str]:
    """What keeps the event from matching, one phrase per failed condition; [] if it matches.

    `labels.severity: expected one of ["critical"], found "low"`, `host: missing`, …
    """
    out = [f"{c.field}: {_failed(c, event)}" for c in criteria.conditions
           if not holds(c, event)]
    for g in criteria.all_of:
        out += [f"all: {reason}" for reason in why_not(g, event)]
    if criteria.any_of and not any(matches(g, event) for g in criteria.any_of):
        tried = "; or ".join(", ".join(why_not(g, event)) for g in criteria.any_of)
        out.append(f"any: none of its {len(criteria.any_of)} alternatives holds ({tried})")
    for g in criteria.none_of:
        if matches(g, event):
            out.append(f"not: the event meets {_shown(g)}")
    return out


def _failed(c: Condition, event: Mapping[str, Any]) -> str:
    actual = lookup(event, c.path)
    if c.op == "exists":
        return "missing" if c.value else f"present ({_j(actual)}), and must not be"
    if actual is _MISSING:
        return "missing"
    expected = {
        "eq": f"expected {_j(c.value)}", "ne": f"expected anything but {_j(c.value)}",
        "in": f"expected one of {_j(c.value)}", "not_in": f"expected none of {_j(c.value)}",
        "regex": f"expected a text matching /{c.value}/",
        "glob": f"expected a text like {c.value!r}",
        "contains": f"expected to contain {_j(c.value)}" if c.within is None else
        f"expected a list with an object meeting {_j(c.value)}",
        "gt": f"expected more than {_j(c.value)}", "gte": f"expected at least {_j(c.value)}",
        "lt": f"expected less than {_j(c.value)}", "lte": f"expected at most {_j(c.value)}",
    }[c.op]
    return f"{expected}, found {_j(actual)}"


def _shown(g: Criteria) -> str:
    parts = [f"{c.field} {c.op} {_j(c.value)}" for c in g.conditions]
    more = ", …" if (g.any_of or g.all_of or g.none_of) else ""
    return "{" + ", ".join(parts) + more + "}"


def _j(value: Any) -> str:
    import json

    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:77] + "…"


def holds(c: Condition, event: Mapping[str, Any]) -> bool:
    """Whether one condition holds for the event."""
    actual = lookup(event, c.path)
    if c.op == "exists":
        return (actual is not _MISSING) == bool(c.value)
    if actual is _MISSING:
        return False
    return _OPS[c.op](actual, c)


def same(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but true is not 1 and "1" is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return bool(a == b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and bool(a == b)


def _ordered(actual: Any, expected: Any) -> tuple[Any, Any] | None:
    numbers = (int, float)
    if isinstance(actual, bool) or isinstance(expected, bool):
        return None
    if isinstance(actual, numbers) and isinstance(expected, numbers):
        return actual, expected
    if isinstance(actual, str) and isinstance(expected, str):
        return actual, expected
    return None


def _compare(fn: Any) -> Any:
    def op(actual: Any, c: Condition) -> bool:
        pair = _ordered(actual, c.value)
        return pair is not None and bool(fn(*pair))
    return op


def _contains(actual: Any, c: Condition) -> bool:
    if c.within is not None:
        return isinstance(actual, list) and any(
            isinstance(item, Mapping) and matches(c.within, item) for item in actual)
    if isinstance(actual, str):
        return isinstance(c.value, str) and c.value in actual
    if isinstance(actual, list):
        return any(same(item, c.value) for item in actual)
    if isinstance(actual, Mapping):
        return isinstance(c.value, str) and c.value in actual
    return False


_OPS: dict[str, Callable[[Any, Condition], bool]] = {
    "eq": lambda a, c: same(a, c.value),
    "ne": lambda a, c: not same(a, c.value),
    "in": lambda a, c: any(same(a, v) for v in c.value),
    "not_in": lambda a, c: not any(same(a, v) for v in c.value),
    "regex": lambda a, c: isinstance(a, str) and c.pattern is not None
    and c.pattern.search(a) is not None,
    "glob": lambda a, c: isinstance(a, str) and fnmatch.fnmatchcase(a, c.value),
    "contains": _contains,
    "gt": _compare(lambda a, b: a > b),
    "gte": _compare(lambda a, b: a >= b),
    "lt": _compare(lambda a, b: a < b),
    "lte": _compare(lambda a, b: a <= b),
}
