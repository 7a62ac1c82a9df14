"""`where:` criteria on events: dotted paths, operators, pure functions.

A field that is missing fails every operator except `exists: false`: a runbook that acts
on production should not fire on an event that lacks what it tests. Numbers compare with
numbers and text with text (so ISO dates order correctly); booleans are not numbers.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

OPERATORS = ("eq", "ne", "in", "not_in", "regex", "glob", "contains",
             "gt", "gte", "lt", "lte", "exists")
_MISSING = object()


class CriteriaError(ValueError):
    """A criterion that cannot work; `key` names the path (and operator) at fault."""

    def __init__(self, message: str, key: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.key = key


class Condition(NamedTuple):
    path: tuple[str, ...]
    op: str
    value: Any
    pattern: re.Pattern[str] | None = None

    @property
    def field(self) -> str:
        return ".".join(self.path)


class Criteria(NamedTuple):
    conditions: tuple[Condition, ...] = ()

    def literal_equalities(self) -> dict[str, Any]:
        """Fields the event must equal exactly (hashable values only): the matcher's index."""
        return {c.field: c.value for c in self.conditions
                if c.op == "eq" and _hashable_scalar(c.value)}


def _hashable_scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None


def parse_where(where: Mapping[str, Any]) -> Criteria:
    """Build Criteria from a `where:` mapping; raise CriteriaError on the first bad entry."""
    conditions: list[Condition] = []
    for key, spec in where.items():
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
    return Criteria(tuple(conditions))


def _condition(path: tuple[str, ...], key: str, op: str, value: Any) -> Condition:
    if op not in OPERATORS:
        from opsrun.suggest import did_you_mean

        raise CriteriaError(f"unknown operator {op!r}{did_you_mean(op, OPERATORS)}; "
                            f"operators are {', '.join(OPERATORS)}", (key, op))
    where = (key, op)
    if op in ("in", "not_in"):
        if not isinstance(value, list):
            raise CriteriaError(f"`{op}` takes a list, like {op}: [a, b]", where)
    elif op in ("regex", "glob"):
        if not isinstance(value, str):
            raise CriteriaError(f"`{op}` takes a text pattern", where)
        if op == "regex":
            try:
                return Condition(path, op, value, re.compile(value))
            except re.error as e:
                raise CriteriaError(f"bad regular expression `{value}`: {e}", where) from None
    elif op == "exists":
        if not isinstance(value, bool):
            raise CriteriaError("`exists` takes true or false", where)
    elif op in ("gt", "gte", "lt", "lte"):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            kind = {list: "a list", dict: "a mapping", bool: "true or false"}.get(
                type(value), "nothing (null)" if value is None else type(value).__name__)
            raise CriteriaError(f"`{op}` compares with a number or a text, not {kind}", where)
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
    """Whether every condition holds for the event."""
    return all(holds(c, event) for c in criteria.conditions)


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
