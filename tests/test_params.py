"""Typed params: defaults, `-p name=value` texts, and the errors a person sees."""
from __future__ import annotations

from typing import Any

import pytest

from opsrun.params import Param, ParamError, coerce_value, resolve


@pytest.mark.parametrize("param, value, result", [
    (Param("s"), "web", "web"),
    (Param("s"), 42, "42"),
    (Param("s"), True, "true"),
    (Param("s"), "", ""),
    (Param("s", pattern=r"^[a-z-]+$"), "web-api", "web-api"),
    (Param("n", type="int"), "12", 12),
    (Param("n", type="int"), " 012 ", 12),
    (Param("n", type="int"), "-3", -3),
    (Param("n", type="int"), 7, 7),
    (Param("f", type="float"), "0.25", 0.25),
    (Param("f", type="float"), 2, 2.0),
    (Param("f", type="float"), "1e3", 1000.0),
    (Param("b", type="bool"), "true", True),
    (Param("b", type="bool"), "Yes", True),
    (Param("b", type="bool"), "on", True),
    (Param("b", type="bool"), "1", True),
    (Param("b", type="bool"), "false", False),
    (Param("b", type="bool"), "NO", False),
    (Param("b", type="bool"), "off", False),
    (Param("b", type="bool"), "0", False),
    (Param("b", type="bool"), False, False),
    (Param("c", type="choice", choices=("prod", "staging")), "prod", "prod"),
    (Param("c", type="choice", choices=("1", "2")), 1, "1"),
])
def test_coerce(param: Param, value: Any, result: Any) -> None:
    got = coerce_value(param, value)
    assert got == result and type(got) is type(result)


@pytest.mark.parametrize("param, value, words", [
    (Param("s", pattern=r"^[a-z-]+$"), "Web", "'Web' does not match the pattern '^[a-z-]+$'"),
    (Param("s", pattern=r"^[a-z]+$"), "web\n", "does not match the pattern"),
    (Param("s"), "a\x00b", "NUL byte"),
    (Param("s"), ["a"], "expected a text, found a list"),
    (Param("n", type="int"), "three", "'three' is not a whole number"),
    (Param("n", type="int"), "1.5", "is not a whole number"),
    (Param("n", type="int"), "0x10", "is not a whole number"),
    (Param("n", type="int"), True, "is not a whole number"),
    (Param("n", type="int"), 3.0, "is not a whole number"),
    (Param("n", type="int"), "9" * 5000, "is not a whole number"),
    (Param("f", type="float"), "fast", "'fast' is not a number"),
    (Param("f", type="float"), "nan", "is not a number"),
    (Param("f", type="float"), "inf", "is not a number"),
    (Param("f", type="float"), False, "is not a number"),
    (Param("b", type="bool"), "maybe", "'maybe' is not a boolean; use true or false"),
    (Param("b", type="bool"), 1, "is not a boolean"),
    (Param("c", type="choice", choices=("prod", "staging")), "dev",
     "'dev' is not one of the choices: prod, staging"),
    (Param("c", type="choice", choices=("prod",)), "Prod", "is not one of the choices"),
])
def test_coerce_errors(param: Param, value: Any, words: str) -> None:
    with pytest.raises(ParamError) as exc:
        coerce_value(param, value)
    assert words in str(exc.value)


def test_coerce_accepts_a_mapping_as_in_the_schema() -> None:
    assert coerce_value({"type": "int"}, "5") == 5
    with pytest.raises(ParamError):
        coerce_value({"type": "string", "pattern": "^a$"}, "b")


PARAMS = {
    "service": Param("service", default="web", pattern=r"^[a-z-]+$"),
    "count": Param("count", type="int", default=2),
    "version": Param("version", required=True),
    "dry": Param("dry", type="bool", default=False),
    "note": Param("note"),
}


def test_resolve_fills_defaults_and_types() -> None:
    assert resolve(PARAMS, {"version": "v1", "count": "5"}) == {
        "service": "web", "count": 5, "version": "v1", "dry": False, "note": None}


def test_resolve_given_values_win() -> None:
    got = resolve(PARAMS, {"version": "v2", "service": "api", "dry": "yes", "note": ""})
    assert (got["service"], got["dry"], got["note"]) == ("api", True, "")


def test_resolve_reports_every_problem_at_once() -> None:
    with pytest.raises(ParamError) as exc:
        resolve(PARAMS, {"servce": "api", "count": "many", "dry": "perhaps"})
    text = str(exc.value)
    assert "unknown param 'servce' (did you mean 'service'?)" in text
    assert "this runbook's params: service, count, version, dry, note" in text
    assert "param 'count': 'many' is not a whole number" in text
    assert "param 'dry': 'perhaps' is not a boolean" in text
    assert "param 'version' is required; give it with -p version=VALUE" in text


def test_resolve_without_params() -> None:
    assert resolve({}, {}) == {}
    with pytest.raises(ParamError, match="unknown param 'x'; this runbook's params: none"):
        resolve({}, {"x": "1"})
