"""Typed runbook parameters: the Param model and turning given values into typed ones."""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


class ParamError(ValueError):
    """A value that does not fit its param; the message says what would."""


class Param(NamedTuple):
    name: str
    type: str = "string"  # string | int | float | bool | choice
    description: str = ""
    default: Any = None
    required: bool = False
    pattern: str | None = None
    choices: tuple[str, ...] = ()


def coerce_value(param: Param | Mapping[str, Any], value: Any) -> Any:
    """Turn a value (from YAML or from `-p name=text`) into the param's type, or raise."""
    p = param if isinstance(param, Param) else Param(
        name=str(param.get("name", "")), type=param["type"],
        pattern=param.get("pattern"), choices=tuple(param.get("choices") or ()))
    kind = p.type
    if kind == "bool":
        return _to_bool(value)
    if kind == "int":
        return _to_int(value)
    if kind == "float":
        return _to_float(value)
    text = _to_text(value)
    if kind == "choice":
        if text not in p.choices:
            raise ParamError(f"{text!r} is not one of the choices: {', '.join(p.choices)}")
        return text
    if p.pattern is not None and not re.fullmatch(p.pattern, text):
        # Shown as written in the runbook: repr() would double every backslash.
        raise ParamError(f"{text!r} does not match the pattern '{p.pattern}'")
    return text


def _to_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        if isinstance(value, str) and "\x00" in value:
            raise ParamError("a value cannot contain a NUL byte")
        return str(value)
    raise ParamError(f"expected a text, found a {type(value).__name__}")


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ParamError(f"{value!r} is not a boolean; use true or false")


def _to_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip(), 10)
        except ValueError:
            pass
    raise ParamError(f"{value!r} is not a whole number")


def _to_float(value: Any) -> float:
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            pass
    if number is None or not math.isfinite(number):  # nan and inf are not numbers to act on
        raise ParamError(f"{value!r} is not a number")
    return number


def resolve(params: Mapping[str, Param], given: Mapping[str, str]) -> dict[str, Any]:
    """Typed values for a run: given `-p` texts checked, defaults filled, required enforced."""
    from opsrun.suggest import did_you_mean

    problems: list[str] = []
    out: dict[str, Any] = {}
    for name in given:
        if name not in params:
            known = ", ".join(params) or "none"
            problems.append(f"unknown param {name!r}{did_you_mean(name, params)}; "
                            f"this runbook's params: {known}")
    for name, p in params.items():
        if name in given:
            try:
                out[name] = coerce_value(p, given[name])
            except ParamError as e:
                problems.append(f"param {name!r}: {e}")
        elif p.default is not None:
            out[name] = coerce_value(p, p.default)
        elif p.required:
            problems.append(f"param {name!r} is required; give it with -p {name}=VALUE")
        else:
            out[name] = None
    if problems:
        raise ParamError("; ".join(problems))
    return out
