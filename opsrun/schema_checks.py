"""Small composable checkers: each validates a value, reports problems, and exports JSON Schema.

The runbook schema in `schema.py` is built from these, so validation and the published JSON
Schema come from one definition. Checkers never stop at the first problem: they report to a
`Problems` collector and carry on, so one `opsrun validate` shows everything wrong at once.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Union

from opsrun.durations import DurationError, format_duration, parse_duration
from opsrun.errors import Problem
from opsrun.suggest import did_you_mean

if TYPE_CHECKING:
    from opsrun.yaml_load import Document

PathT = tuple[Union[str, int], ...]
INVALID: Any = object()  # returned by a checker whose value was reported as wrong


class Problems:
    """Collects (path, message, at_key, offset) for one document."""

    def __init__(self) -> None:
        self.items: list[tuple[PathT, str, bool, int]] = []

    def add(self, path: PathT, message: str, *, at_key: bool = False, offset: int = -1) -> None:
        self.items.append((tuple(path), message, at_key, offset))

    def __bool__(self) -> bool:
        return bool(self.items)

    def located(self, doc: Document, file: Path) -> list[Problem]:
        """The problems with the line and column each names in `doc`, in file order."""
        out = []
        for p, message, at_key, offset in self.items:
            line, col = doc.mark_in_value(p, offset) if offset >= 0 else \
                doc.mark(p, key=at_key)
            out.append(Problem(str(file), line, col, message))
        return sorted(set(out), key=lambda pr: (pr.line, pr.col, pr.message))


def show_path(path: PathT) -> str:
    """`steps[2].retry.delay` for ('steps', 2, 'retry', 'delay')."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "the runbook"


def type_name(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the text {value!r}" if len(value) < 40 else "a text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__


class Check:
    """Base checker: `check` returns the cleaned value or INVALID after reporting."""

    expects = "a value"
    description = ""

    def check(self, value: Any, path: PathT, problems: Problems) -> Any:
        return value

    def schema(self) -> dict[str, Any]:
        return self._with_description({})

    def _with_description(self, s: dict[str, Any]) -> dict[str, Any]:
        if self.description:
            s["description"] = self.description
        return s

    def wrong_type(self, value: Any, path: PathT, problems: Problems) -> Any:
        problems.add(path, f"{show_path(path)}: expected {self.expects}, found {type_name(value)}")
        return INVALID


class Text(Check):
    def __init__(self, *, pattern: str | None = None, hint: str = "", description: str = "",
                 scalars: bool = False, nonempty: bool = True) -> None:
        self.pattern = re.compile(pattern) if pattern else None
        self.hint = hint
        self.description = description
        self.scalars = scalars  # numbers and booleans are accepted and turned into text
        self.nonempty = nonempty
        self.expects = "a text"

    def check(self, value: Any, path: PathT, problems: Problems) -> Any:
        if self.scalars and isinstance(value, bool):
            value = "true" if value else "false"
        elif self.scalars and isinstance(value, (int, float)):
            value = str(value)
        if not isinstance(value, str):
            return self.wrong_type(value, path, problems)
        if self.nonempty and not value.strip():
            problems.add(path, f"{show_path(path)}: must not be empty")
            return INVALID
        if self.pattern and not self.pattern.fullmatch(value):
            problems.add(path, f"{show_path(path)}: {value!r} is not allowed; {self.hint}")
            return INVALID
        return value

    def schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": ["string", "number", "boolean"] if self.scalars else "string"}
        if self.pattern:
            s["pattern"] = f"^(?:{self.pattern.pattern})$"
        if self.nonempty and not self.scalars:
            s["minLength"] = 1
        return self._with_description(s)


class Integer(Check):
    def __init__(self, *, minimum: int | None = None, maximum: int | None = None,
                 description: str = "") -> None:
        self.minimum, self.maximum, self.description = minimum, maximum, description
        self.expects = "a whole number"

    def check(self, value: Any, path: PathT, problems: Problems) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            return self.wrong_type(value, path, problems)
        if self.minimum is not None and value < self.minimum:
            problems.add(path, f"{show_path(path)}: must be at least {self.minimum}, found {value}")
            return INVALID
        if self.maximum is not None and value > self.maximum:
            problems.add(path, f"{show_path(path)}: must be at most {self.maximum}, found {value}")
            return INVALID
        return value

    def schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "integer"}
        if self.minimum is not None:
            s["minimum"] = self.minimum
        if self.maximum is not None:
            s["maximum"] = self.maximum
        return self._with_description(s)


class Number(Check):
    def __init__(self, *, minimum: float | None = None, description: str = "") -> None:
        self.minimum, self.description = minimum, description
        self.expects = "a number"

    def check(self, value: Any, path: PathT, problems: Problems) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return self.wrong_type(value, path, problems)
        if self.minimum is not None and value < self.minimum:
            problems.add(path, f"{show_path(path)}: must be at least {self.minimum:g}, "
                               f"found {value:g}")
            return INVALID
        return float(value)

    def schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "number"}
        if self.minimum is not None:
            s["minimum"] = self.minimum
        return self._with_description(s)


class Boolean(Check):
    expects = "true or false"

    def __init__(self, *, description: str = "") -> None:
        self.description = description

    def check(self, value: Any, path: PathT, problems: Problems) -> Any:
        if isinstance(value, str) and value.lower() in ("yes", "no", "on", "off", "y", "n"):
            meant = "true" if value.lower() in ("yes", "on", "y") else "false"
            problems.add(path, f"{show_path(path)}: expected true or false, found the text "
                               f"{value!r} (YAML 1.2 reads yes/no/on/off as text); "
                               f"write {meant}")
            return INVALID
        if not isinstance(value, bool):
            return self.wrong_type(value, path, problems)
        return value

    def schema(self) -> dict[str, Any]:
        return self._with_description({"type": "boolean"})


class Duration(Check):
    """`30s` → 30.0 seconds."""

    expects = "a duration like 30s"

    def __init__(self, *, description: str = "", minimum_s: float = 0.0,
                 too_short: str = "") -> None:
        self.description = description
        self.minimum_s = minimum_s
        self.too_short = too_short  # what to write instead, said after the minimum

    def check(self, value: Any, path: PathT, problems: Problems) -> Any:
        try:
            seconds = parse_duration(value)
        except DurationError as e:
            problems.add(path, f"{show_path(path)}: {e}")
            return INVALID
        if seconds < self.minimum_s:
            problems.add(path, f"{show_path(path)}: must be at least "
                               f"{format_duration(self.minimum_s)}, found {value!r}"
                               + (f"; {self.too_short}" if self.too_short else ""))
            return INVALID
        return seconds

    def schema(self) -> dict[str, Any]:
        return self._with_description({
            "type": ["string", "number"],
            "pattern": r"^\s*(\d+(\.\d+)?\s*(ms|s|m|h|d)\s*)+$",
        })


class Enum(Check):
    def __init__(self, *values: str, description: str = "",
                 synonyms: Mapping[str, str] | None = None) -> None:
        self.values = values
        self.description = description
        self.synonyms = dict(synonyms or {})  # words people write instead → the right value
        self.expects = "one of " + ", ".join(values)

    def check(self, value: Any, path: PathT, problems: Problems) -> Any:
        if value not in self.values or not isinstance(value, str):
            hint = did_you_mean(str(value), self.values) if isinstance(value, str) else ""
            if isinstance(value, str) and value.lower() in self.synonyms:
                hint = f" (did you mean {self.synonyms[value.lower()]!r}?)"
            problems.add(path, f"{show_path(path)}: {type_name(value)} is not one of "
                               f"{', '.join(self.values)}{hint}")
            return INVALID
        return value

    def schema(self) -> dict[str, Any]:
        return self._with_description({"enum": list(self.values)})


class Anything(Check):
    """Any plain value (JSON)."""

    def __init__(self, *, description: str = "") -> None:
        self.description = description


class Lazy(Check):
    """A checker defined later (a step holds steps); in the JSON schema, a `$ref` to its $defs."""

    def __init__(self, get: Callable[[], Check], ref: str) -> None:
        self.get, self.ref = get, ref

    @property
    def expects(self) -> str:  # type: ignore[override]
        return self.get().expects

    def check(self, value: Any, path: PathT, problems: Problems) -> Any:
        return self.get().check(value, path, problems)

    def schema(self) -> dict[str, Any]:
        return {"$ref": f"#/$defs/{self.ref}"}


class PositionedError(ValueError):
    """A ValueError that knows which character of the checked text is at fault."""

    def __init__(self, message: str, offset: int = -1) -> None:
        super().__init__(message)
        self.offset = offset


class Custom(Check):
    """A text checked by a function that raises ValueError with a readable message (a
    PositionedError points at the character at fault)."""

    def __init__(self, fn: Callable[[str], Any], *, expects: str, description: str = "",
                 json: dict[str, Any] | None = None) -> None:
        self.fn, self.expects, self.description = fn, expects, description
        self.json = json or {"type": "string"}

    def check(self, value: Any, path: PathT, problems: Problems) -> Any:
        if not isinstance(value, str):
            return self.wrong_type(value, path, problems)
        try:
            return self.fn(value)
        except ValueError as e:
            problems.add(path, f"{show_path(path)}: {e}",
                         offset=e.offset if isinstance(e, PositionedError) else -1)
            return INVALID

    def schema(self) -> dict[str, Any]:
        return self._with_description(dict(self.json))


class ListOf(Check):
    def __init__(self, item: Check, *, min_items: int = 0, single_ok: bool = False,
                 description: str = "", expects: str = "a list", too_few: str = "") -> None:
        self.item, self.min_items, self.single_ok = item, min_items, single_ok
        self.description = description
        self.expects = expects
        self.too_few = too_few  # says what belongs in the list, in place of the item count

    def check(self, value: Any, path: PathT, problems: Problems) -> Any:
        if self.single_ok and not isinstance(value, (list, Mapping)) and value is not None:
            value = [value]
        if not isinstance(value, list):
            return self.wrong_type(value, path, problems)
        if len(value) < self.min_items:
            problems.add(path, f"{show_path(path)}: " + (self.too_few or (
                f"needs at least {self.min_items} item{'s' if self.min_items > 1 else ''}")))
            return INVALID
        out = [self.item.check(v, (*path, i), problems) for i, v in enumerate(value)]
        return INVALID if any(v is INVALID for v in out) else out

    def schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "array", "items": self.item.schema()}
        if self.min_items:
            s["minItems"] = self.min_items
        if self.single_ok:
            s = {"anyOf": [s, self.item.schema()]}
        return self._with_description(s)


class MapOf(Check):
    def __init__(self, value: Check, *, key_pattern: str, key_hint: str,
                 description: str = "") -> None:
        self.value = value
        self.key_pattern = re.compile(key_pattern)
        self.key_hint = key_hint
        self.description = description
        self.expects = "a mapping"

    def check(self, value: Any, path: PathT, problems: Problems) -> Any:
        if not isinstance(value, Mapping):
            return self.wrong_type(value, path, problems)
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not self.key_pattern.fullmatch(k):
                problems.add((*path, k), f"{show_path((*path, k))}: {k!r} is not a valid "
                                         f"name; {self.key_hint}", at_key=True)
                continue
            out[k] = self.value.check(v, (*path, k), problems)
        return INVALID if any(v is INVALID for v in out.values()) else out

    def schema(self) -> dict[str, Any]:
        return self._with_description({
            "type": "object",
            "propertyNames": {"pattern": f"^(?:{self.key_pattern.pattern})$"},
            "additionalProperties": self.value.schema(),
        })


class Alternatives(Check):
    """The first alternative whose `accepts(value)` is true checks the value."""

    def __init__(self, *options: tuple[Callable[[Any], bool], Check], expects: str,
                 description: str = "") -> None:
        self.options, self.expects, self.description = options, expects, description

    def check(self, value: Any, path: PathT, problems: Problems) -> Any:
        for accepts, checker in self.options:
            if accepts(value):
                return checker.check(value, path, problems)
        return self.wrong_type(value, path, problems)

    def schema(self) -> dict[str, Any]:
        return self._with_description({"anyOf": [c.schema() for _, c in self.options]})


class Field(NamedTuple):
    check: Check
    required: bool = False
    default: Any = None


class Object(Check):
    """A mapping with known keys; unknown keys are reported with a "did you mean" hint."""

    def __init__(self, what: str, fields: dict[str, Field], *, description: str = "",
                 rules: Callable[[dict[str, Any], PathT, Problems], None] | None = None,
                 json_extra: dict[str, Any] | None = None,
                 synonyms: Mapping[str, str] | None = None,
                 refused: Mapping[str, str] | None = None) -> None:
        self.what, self.fields, self.description = what, fields, description
        self.synonyms = dict(synonyms or {})  # keys from other tools → ours, for the hint
        self.refused = dict(refused or {})  # keys never accepted, with the reason why
        self.rules = rules
        self.json_extra = json_extra or {}
        self.expects = f"a mapping ({what})"

    def check(self, value: Any, path: PathT, problems: Problems) -> Any:
        if not isinstance(value, Mapping):
            return self.wrong_type(value, path, problems)
        out: dict[str, Any] = {}
        bad = False
        for k, v in value.items():
            if k in self.refused:
                problems.add((*path, k), f"{show_path((*path, k))}: {self.refused[k]}",
                             at_key=True)
                bad = True
                continue
            if k not in self.fields:
                hint = (f" (did you mean {self.synonyms[k]!r}?)" if k in self.synonyms
                        else did_you_mean(k, self.fields))
                problems.add((*path, k), f"{show_path((*path, k))}: unknown key {k!r} in "
                             f"{self.what}{hint}; known keys: "
                             f"{', '.join(self.fields)}", at_key=True)
                bad = True
                continue
            out[k] = self.fields[k].check.check(v, (*path, k), problems)
            bad = bad or out[k] is INVALID
        for k, f in self.fields.items():
            if k in out:
                continue
            if f.required:
                where = f"{show_path(path)}: " if path else ""
                problems.add(path, f"{where}{self.what} is missing the required key {k!r}")
                bad = True
            else:
                out[k] = f.default
        if self.rules and not bad:
            self.rules(out, path, problems)
        return INVALID if bad else out

    def schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {
            "type": "object",
            "properties": {k: f.check.schema() for k, f in self.fields.items()},
            "additionalProperties": False,
        }
        required = [k for k, f in self.fields.items() if f.required]
        if required:
            s["required"] = required
        s.update(self.json_extra)
        return self._with_description(s)
