"""`${{ … }}` expressions: split out of text, checked at validation, evaluated in a sandbox.

Jinja2's SandboxedEnvironment evaluates each expression on its own (we split the text
ourselves), so literal text — `docker inspect -f '{{.State}}'`, `{% … %}` — is never
template syntax. Undefined names and fields raise instead of becoming empty strings.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Union

from opsrun.errors import ExpressionError

ROOT_NAMES = ("event", "params", "env", "steps", "run", "secrets")
OPEN, CLOSE = "${{", "}}"
MAX_RESULT_CHARS = 1_000_000


class ExpressionSyntaxError(ValueError):
    """An expression that cannot be parsed; `offset` is its position in the source text."""

    def __init__(self, message: str, offset: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset


@dataclass(frozen=True)
class Expr:
    """One `${{ … }}` (or a bare `if:` expression): its source and where it starts."""

    source: str
    offset: int = 0


Part = Union[str, Expr]


@dataclass(frozen=True)
class Ref:
    """A name an expression reads: `steps.build.outputs.x` → Ref('steps', 'build')."""

    root: str
    key: str | None


def split(text: str) -> list[Part]:
    """Split text into literal strings and Expr parts."""
    parts: list[Part] = []
    pos = 0
    while True:
        start = text.find(OPEN, pos)
        if start < 0:
            if pos < len(text):
                parts.append(text[pos:])
            return parts
        if start > pos:
            parts.append(text[pos:start])
        end = _find_close(text, start + len(OPEN))
        if end < 0:
            raise ExpressionSyntaxError("`${{` is never closed with `}}`", start)
        source = text[start + len(OPEN):end].strip()
        if not source:
            raise ExpressionSyntaxError("empty expression `${{ }}`", start)
        parts.append(Expr(source, start))
        pos = end + len(CLOSE)


def _find_close(text: str, pos: int) -> int:
    """Index of the `}}` closing an expression, skipping quoted strings inside it."""
    quote = ""
    i = pos
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif text.startswith(CLOSE, i):
            return i
        i += 1
    return -1


def has_expressions(text: str) -> bool:
    return OPEN in text


@lru_cache(maxsize=1)
def _environment() -> Any:
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    class _Env(SandboxedEnvironment):  # type: ignore[misc]
        # Bound `*` and `**` so that `'x' * 10**12` cannot eat the machine.
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**":
                if isinstance(right, (int, float)) and abs(right) > 1000:
                    raise ExpressionError("exponent too large in `**` (limit 1000)")
                if isinstance(left, (int, float)) and abs(left) > 1e100:
                    raise ExpressionError("base too large in `**`")
            if operator == "*":
                size = _repeat_size(left, right)
                if size > MAX_RESULT_CHARS:
                    raise ExpressionError(f"`*` would build a value of {size:,} items; "
                                          f"the limit is {MAX_RESULT_CHARS:,}")
            return super().call_binop(context, operator, left, right)

        def getattr(self, obj: Any, attribute: str) -> Any:
            # Fields win over dict methods: `event.items` is the event's field, not dict.items.
            if isinstance(obj, Mapping) and attribute in obj:
                return obj[attribute]
            return super().getattr(obj, attribute)

    env = _Env(undefined=StrictUndefined, autoescape=False)
    env.globals.clear()
    # Only filters whose output stays about the size of their input.
    env.filters = {name: env.filters[name] for name in _FILTERS if name in env.filters}
    env.filters["basename"] = lambda p: str(p).rstrip("/").rsplit("/", 1)[-1]
    env.filters["dirname"] = lambda p: str(p).rstrip("/").rsplit("/", 1)[0] or "/"
    return env


_FILTERS = (
    "abs", "attr", "batch", "capitalize", "count", "d", "default", "dictsort", "e", "escape",
    "first", "float", "groupby", "int", "items", "join", "last", "length", "list", "lower",
    "map", "max", "min", "reject", "rejectattr", "replace", "reverse", "round", "select",
    "selectattr", "slice", "sort", "string", "striptags", "sum", "title", "tojson", "trim",
    "truncate", "unique", "upper", "urlencode", "wordcount",
)


def _repeat_size(left: Any, right: Any) -> int:
    for seq, n in ((left, right), (right, left)):
        if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
            return len(seq) * max(n, 0)
    return 0


@lru_cache(maxsize=4096)
def _compile(source: str) -> Any:
    from jinja2 import TemplateSyntaxError
    from jinja2.exceptions import TemplateAssertionError

    try:
        return _environment().compile_expression(source, undefined_to_none=False)
    except (TemplateSyntaxError, TemplateAssertionError) as e:
        raise ExpressionSyntaxError(f"cannot parse `{source}`: {e.message}") from None


def check(source: str) -> list[Ref]:
    """Parse an expression and return the names it reads; raise ExpressionSyntaxError if bad."""
    from jinja2 import TemplateSyntaxError, nodes

    _compile(source)
    try:
        tree = _environment().parse("{{ (" + source + ") }}")
    except TemplateSyntaxError as e:
        raise ExpressionSyntaxError(f"cannot parse `{source}`: {e.message}") from None
    refs: list[Ref] = []
    seen_names: set[int] = set()
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        key = _static_key(node)
        if isinstance(key, str) and key.startswith("_"):
            raise ExpressionSyntaxError(f"`{source}`: names starting with `_` are private "
                                        "and cannot be read")
        if isinstance(node.node, nodes.Name):
            seen_names.add(id(node.node))
            refs.append(Ref(node.node.name, key if isinstance(key, str) else None))
    for name in tree.find_all(nodes.Name):
        if name.name.startswith("_"):
            raise ExpressionSyntaxError(f"`{source}`: names starting with `_` are private")
        if id(name) not in seen_names and name.ctx == "load":
            refs.append(Ref(name.name, None))
    return refs


def _static_key(node: Any) -> object:
    from jinja2 import nodes

    if isinstance(node, nodes.Getattr):
        return node.attr
    if isinstance(node.arg, nodes.Const):
        return node.arg.value
    return None


def evaluate(source: str, context: Mapping[str, Any]) -> Any:
    """Evaluate one expression against a context; undefined names raise ExpressionError."""
    from jinja2 import Undefined
    from jinja2.exceptions import SecurityError, UndefinedError

    fn = _compile(source)
    try:
        value = fn(**context)
    except UndefinedError as e:
        raise ExpressionError(f"`${{{{ {source} }}}}`: {_explain_undefined(e)}") from None
    except SecurityError as e:
        raise ExpressionError(f"`${{{{ {source} }}}}` is not allowed: {e}") from None
    except ExpressionError as e:
        raise ExpressionError(f"`${{{{ {source} }}}}`: {e}") from None
    except (TypeError, ValueError, ZeroDivisionError, OverflowError, ArithmeticError,
            RecursionError, MemoryError) as e:
        raise ExpressionError(f"`${{{{ {source} }}}}` failed: {e}") from None
    except Exception as e:  # noqa: BLE001 - a sandboxed expression must never crash opsrun
        raise ExpressionError(f"`${{{{ {source} }}}}` failed: {type(e).__name__}: {e}") from None
    if isinstance(value, Undefined):
        raise ExpressionError(f"`${{{{ {source} }}}}` is not defined "
                              "(use `… | default('x')` for an optional value)")
    if callable(value):
        raise ExpressionError(f"`${{{{ {source} }}}}` is a function, not a value; "
                              "call it with ( ) or drop the attribute")
    return value


def _explain_undefined(e: Exception) -> str:
    text = str(e).replace("'dict object'", "the value")
    return f"{text} (use `… | default('x')` for an optional value)"


def truthy(source: str, context: Mapping[str, Any]) -> bool:
    """Evaluate an `if:` condition."""
    return bool(evaluate(source, context))


def to_text(value: Any) -> str:
    """How an evaluated value reads when put into text: JSON for lists and maps."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    if isinstance(value, (str, int, float)):
        return str(value)
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    return str(value)


def render_text(text: str, context: Mapping[str, Any]) -> str:
    """Render text with expressions as plain text (env values, confirm questions, paths)."""
    out: list[str] = []
    try:
        parts = split(text)
    except ExpressionSyntaxError as e:
        raise ExpressionError(e.message) from None
    for part in parts:
        out.append(to_text(evaluate(part.source, context)) if isinstance(part, Expr) else part)
    return "".join(out)
