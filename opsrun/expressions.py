"""`${{ … }}` expressions: split out of text, checked at validation, evaluated in a sandbox.

Jinja2's SandboxedEnvironment evaluates each expression on its own (we split the text
ourselves), so literal text — `docker inspect -f '{{.State}}'`, `{% … %}` — is never
template syntax. Undefined names and fields raise instead of becoming empty strings.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, NamedTuple, Union

from opsrun.errors import ExpressionError

ROOT_NAMES = ("event", "params", "env", "steps", "run", "secrets")
OPEN, CLOSE = "${{", "}}"
MAX_RESULT_CHARS = 1_000_000
MAX_INT_BITS = 4_000  # about 1,200 digits: far below what str() of an int refuses (4,300)


class ExpressionSyntaxError(ValueError):
    """An expression that cannot be parsed; `offset` is its position in the source text."""

    def __init__(self, message: str, offset: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset


class Expr(NamedTuple):
    """One `${{ … }}` (or a bare `if:` expression): its source and where it starts."""

    source: str
    offset: int = 0


Part = Union[str, Expr]


class Ref(NamedTuple):
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
            raise ExpressionSyntaxError("empty expression `${{ }}`; write what to insert, like "
                                        "`${{ params.name }}`, or remove it", start)
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
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Immutable: `event.pop('x')` or `params.update(…)` must not change the run's context.
    class _Env(ImmutableSandboxedEnvironment):
        # Bound `*`, `**` and `%` so that `'x' * 10**12` cannot eat the machine.
        intercepted_binops = frozenset({"*", "**", "%"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**":
                if isinstance(right, (int, float)) and abs(right) > 1000:
                    raise ExpressionError("exponent too large in `**` (limit 1000)")
                if isinstance(left, (int, float)) and abs(left) > 1e100:
                    raise ExpressionError("base too large in `**`")
                if (isinstance(left, int) and isinstance(right, int) and right > 0
                        and abs(left) > 1 and right * math.log2(abs(left)) > MAX_INT_BITS):
                    raise ExpressionError("the result of `**` would be too large a number")
            if operator == "*":
                if (isinstance(left, int) and isinstance(right, int)
                        and left.bit_length() + right.bit_length() > MAX_INT_BITS):
                    raise ExpressionError("the result of `*` would be too large a number")
                size = _repeat_size(left, right)
                if size > MAX_RESULT_CHARS:
                    raise ExpressionError(f"`*` would build a value of {size:,} characters; "
                                          f"the limit is {MAX_RESULT_CHARS:,}")
            if operator == "%" and isinstance(left, str):
                _check_format(left, _PERCENT_WIDTH)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context: Any, __obj: Any, *args: Any,  # noqa: N805
                 **kwargs: Any) -> Any:
            # str methods that pad: `'x'.center(10**9)` would build a gigabyte.
            if (getattr(__obj, "__name__", "") in _PADDING
                    and isinstance(getattr(__obj, "__self__", None), str)):
                width = args[0] if args else 8
                if isinstance(width, int) and width * (
                        len(__obj.__self__) if __obj.__name__ == "expandtabs" else 1
                ) > MAX_RESULT_CHARS:
                    raise ExpressionError(f"`{__obj.__name__}({width})` would build a value "
                                          f"over {MAX_RESULT_CHARS:,} characters")
            return super().call(__context, __obj, *args, **kwargs)

        def wrap_str_format(self, value: Any) -> Any:
            wrapped = super().wrap_str_format(value)
            if wrapped is None:
                return None
            _check_format(value.__self__, _BRACE_WIDTH)
            return wrapped

        def getattr(self, obj: Any, attribute: str) -> Any:
            # Fields win over dict methods: `event.items` is the event's field, not dict.items.
            if isinstance(obj, Mapping) and attribute in obj:
                return obj[attribute]
            return super().getattr(obj, attribute)

    env = _Env(undefined=StrictUndefined, autoescape=False)
    env.globals.clear()
    # Only filters whose output stays about the size of their input.
    env.filters = {name: env.filters[name] for name in _FILTERS if name in env.filters}
    # `'abc' | int` is an error, not a silent 0, unless a fallback is given: `| int(0)`.
    env.filters["int"] = _int_filter
    env.filters["float"] = _float_filter
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


_NO_DEFAULT: Any = object()


def _int_filter(value: Any, default: Any = _NO_DEFAULT, base: int = 10) -> Any:
    try:
        if isinstance(value, str):
            try:
                return int(value.strip(), base)
            except ValueError:
                if base != 10:
                    raise
                return int(float(value))
        return int(value)
    except (TypeError, ValueError, OverflowError):
        if default is not _NO_DEFAULT:
            return default
        raise ExpressionError(f"{_short(value)} is not a whole number; give a fallback "
                              "with `| int(0)` if that is expected") from None


def _float_filter(value: Any, default: Any = _NO_DEFAULT) -> Any:
    try:
        return float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        if default is not _NO_DEFAULT:
            return default
        raise ExpressionError(f"{_short(value)} is not a number; give a fallback "
                              "with `| float(0)` if that is expected") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _repeat_size(left: Any, right: Any) -> int:
    for seq, n in ((left, right), (right, left)):
        if isinstance(seq, (str, list, tuple)) and isinstance(n, int) \
                and not isinstance(n, bool):
            # A list of long texts is as big as its texts: `[event.line] * 10**6 | join`.
            size = len(seq) if isinstance(seq, str) else len(seq) + sum(
                len(item) for item in seq if isinstance(item, (str, list, tuple, Mapping)))
            return size * max(n, 0)
    return 0


_PADDING = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
# Widths and precisions in `'%9d' % x` and `'{:>9}'.format(x)`; `*` and nested `{}` take
# the width from a value, which is refused.
_PERCENT_WIDTH = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?")
_BRACE_WIDTH = re.compile(r"\{[^{}:]*:((?:[^{}]|\{[^{}]*\})*)\}")


def _check_format(fmt: str, pattern: re.Pattern[str]) -> None:
    for m in pattern.finditer(fmt):
        spec = "".join(g or "" for g in m.groups())
        if "*" in spec or "{" in spec:
            raise ExpressionError("a format width taken from a value (`*` or `{}`) is not "
                                  "allowed; write the width as a number")
        if any(int(n) > MAX_RESULT_CHARS for n in re.findall(r"\d+", spec)):
            raise ExpressionError(f"a format width over {MAX_RESULT_CHARS:,} is not allowed")


@lru_cache(maxsize=4096)
def _compile(source: str) -> Any:
    from jinja2 import TemplateSyntaxError
    from jinja2.exceptions import TemplateAssertionError

    try:
        return _environment().compile_expression(source, undefined_to_none=False)
    except (TemplateSyntaxError, TemplateAssertionError) as e:
        raise ExpressionSyntaxError(_explain_syntax(source, e.message or "")) from None


_HINTS = (
    (re.compile(r"^\s*\$\{\{.*\}\}\s*$", re.S),
     "this field is already an expression: write it without `${{ }}`"),
    (re.compile(r"(?<![=!<>])=(?!=)"), "compare with `==`, not `=`"),
    (re.compile(r"&&|\|\|"), "write `and` / `or` instead of `&&` / `||`"),
    (re.compile(r"\|\s*$"), "a filter must follow `|`, like `| default('x')` or `| int`"),
    (re.compile(r"!(?!=)"), "write `not x` instead of `!x`"),
    (re.compile(r"\?"), "write `a if condition else b` instead of `condition ? a : b`"),
)


def _explain_syntax(source: str, message: str) -> str:
    """Jinja's parser message in words for runbook authors, with a hint for common slips."""
    message = (message.replace("chunk after expression",
                               "unexpected text after a complete expression")
               .replace("'end of template'", "end of the expression")
               .replace("end of template", "end of the expression").rstrip("."))
    if re.search(r"""unexpected char ["']["']""", message):
        return f"cannot parse `{source}`: a text in quotes is never closed"
    bare = re.sub(r"'[^']*'|\"[^\"]*\"", "''", source)  # hints look outside quoted texts
    for pattern, hint in _HINTS:
        if pattern.search(bare):
            return f"cannot parse `{source}`: {message}; {hint}"
    return f"cannot parse `{source}`: {message}"


def check(source: str) -> list[Ref]:
    """Parse an expression and return the names it reads; raise ExpressionSyntaxError if bad."""
    from jinja2 import TemplateSyntaxError, nodes

    _compile(source)
    try:
        tree = _environment().parse("{{ (" + source + ") }}")
    except TemplateSyntaxError as e:
        raise ExpressionSyntaxError(_explain_syntax(source, e.message or "")) from None
    refs: list[Ref] = []
    seen_names: set[int] = set()
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        key = _static_key(node)
        # Data may have such keys (journald's `_SYSTEMD_UNIT`): `event['_X']` reads one,
        # while attributes starting with `_` (and `['__x']`) reach Python's internals.
        private = "__" if isinstance(node, nodes.Getitem) else "_"
        if isinstance(key, str) and key.startswith(private):
            raise ExpressionSyntaxError(f"`{source}`: names starting with `{private}` are "
                                        "private and cannot be read" + (
                                            f"; a field named {key!r} is read with brackets: "
                                            f"['{key}']" if private == "_" and not
                                            key.startswith("__") else ""))
        if isinstance(node.node, nodes.Name):
            seen_names.add(id(node.node))
            refs.append(Ref(node.node.name, key if isinstance(key, str) else None))
    for name in tree.find_all(nodes.Name):
        if name.name.startswith("_"):
            raise ExpressionSyntaxError(f"`{source}`: names starting with `_` are private")
        if id(name) not in seen_names and name.ctx == "load":
            refs.append(Ref(name.name, None))
    return refs


@lru_cache(maxsize=4096)
def _names(source: str) -> frozenset[str]:
    """The top-level names an expression reads."""
    from jinja2 import nodes

    tree = _environment().parse("{{ (" + source + ") }}")
    return frozenset(n.name for n in tree.find_all(nodes.Name) if n.ctx == "load")


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
    for name in _names(source):
        # Jinja answers some names itself (`self` is the template): only the context's count.
        if name not in context:
            raise ExpressionError(f"`${{{{ {source} }}}}`: unknown name {name!r}; expressions "
                                  f"can read {', '.join(context) or 'nothing here'}")
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
        if getattr(value, "_undefined_exception", None) is SecurityError:
            raise ExpressionError(f"`${{{{ {source} }}}}` is not allowed: "
                                  f"{getattr(value, '_undefined_hint', '')}")
        raise ExpressionError(f"`${{{{ {source} }}}}` is not defined "
                              "(use `… | default('x')` for an optional value)")
    if callable(value):
        raise ExpressionError(f"`${{{{ {source} }}}}` is a function, not a value; "
                              "call it with ( ) or drop the attribute")
    return value


def _explain_undefined(e: Exception) -> str:
    text = str(e)
    m = re.fullmatch(r"'(\w+) object' has no attribute (.+)", text)
    if m:
        text = f"there is no field {m.group(2)}" if m.group(1) == "dict" else (
            f"a {m.group(1)} has no field {m.group(2)}")
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


def render_value(value: Any, context: Mapping[str, Any]) -> Any:
    """Render the texts inside a JSON-like value (an `emit:` event, `with:` inputs).

    A text that is one expression and nothing else keeps the value's type, so
    `count: ${{ steps.n.outputs.n | int }}` is a number and `alerts: ${{ event.alerts }}`
    a list; any other text is rendered as text.
    """
    if isinstance(value, str):
        try:
            parts = split(value.strip())
        except ExpressionSyntaxError as e:
            raise ExpressionError(e.message) from None
        if len(parts) == 1 and isinstance(parts[0], Expr):
            return evaluate(parts[0].source, context)
        return render_text(value, context)
    if isinstance(value, Mapping):
        return {str(k): render_value(v, context) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [render_value(v, context) for v in value]
    return value
