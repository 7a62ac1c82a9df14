"""`${{ … }}` expressions: splitting, checking, and a sandbox that neither leaks nor mutates."""
from __future__ import annotations

import copy
from typing import Any

import pytest

from opsrun import expressions as ex
from opsrun.errors import ExpressionError
from opsrun.expressions import Expr, ExpressionSyntaxError, Ref


def context() -> dict[str, Any]:
    return {
        "event": {"source": "file", "path": "/srv/drop/a b.csv", "items": "the items field",
                  "keys": 3, "count": 7, "labels": {"host": "web-1"}, "tags": ["a", "b"],
                  "port": "8080", "ratio": "0.25"},
        "params": {"service": "web", "dry": False, "n": 2},
        "env": {"HOME": "/root"},
        "steps": {"check": {"exit_code": 1, "stdout": "inactive\n", "outputs": {"v": "1.2"}}},
        "run": {"id": "r-1", "runbook": "demo"},
        "secrets": {"TOKEN": "s3cret"},
    }


# ── split ───────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("text, parts", [
    ("plain text", ["plain text"]),
    ("", []),
    ("${{ a }}", [Expr("a", 0)]),
    ("rm ${{ event.path }} now", ["rm ", Expr("event.path", 3), " now"]),
    ("${{a}}${{ b }}", [Expr("a", 0), Expr("b", 6)]),
    ("echo ${{ '}}' }} x", ["echo ", Expr("'}}'", 5), " x"]),
    ('echo ${{ "a}}b" ~ \'}}\' }}!', ["echo ", Expr('"a}}b" ~ \'}}\'', 5), "!"]),
    (r"${{ 'it\'s }}' }}", [Expr(r"'it\'s }}'", 0)]),
    # Literal braces that are not ours stay text: Go templates, Jinja, shell.
    ("docker inspect -f '{{.State.Status}}' web", ["docker inspect -f '{{.State.Status}}' web"]),
    ("{% raw %} {{ x }} ${ HOME } $HOME", ["{% raw %} {{ x }} ${ HOME } $HOME"]),
    ("a $ {{ b }}", ["a $ {{ b }}"]),
    ("x\n  ${{ params.n }}\n", ["x\n  ", Expr("params.n", 4), "\n"]),
])
def test_split(text: str, parts: list[object]) -> None:
    assert ex.split(text) == parts


@pytest.mark.parametrize("text, offset, words", [
    ("echo ${{ a ", 5, "never closed"),
    ("echo ${{ 'x }}", 5, "never closed"),  # the }} is inside a quoted text
    ("ok ${{ a }} then ${{ b }", 17, "never closed"),
    ("${{ }}", 0, "empty expression"),
    ("a ${{     }} b", 2, "empty expression"),
])
def test_split_errors(text: str, offset: int, words: str) -> None:
    with pytest.raises(ExpressionSyntaxError) as exc:
        ex.split(text)
    assert exc.value.offset == offset
    assert words in exc.value.message


def test_has_expressions() -> None:
    assert ex.has_expressions("a ${{ b }}")
    assert not ex.has_expressions("a {{ b }} ${HOME}")


# ── check: the names an expression reads ────────────────────────────────────

@pytest.mark.parametrize("source, refs", [
    ("event.path", [Ref("event", "path")]),
    ("event['path']", [Ref("event", "path")]),
    ("steps.check.outputs.v", [Ref("steps", "check")]),
    ("steps['check'].exit_code != 0", [Ref("steps", "check")]),
    ("params.n + 1 > 2 and not params.dry", [Ref("params", "n"), Ref("params", "dry")]),
    ("event", [Ref("event", None)]),
    ("event[params.key]", [Ref("event", None), Ref("params", "key")]),
    ("event.tags[0]", [Ref("event", "tags")]),
    ("event.path | basename | upper", [Ref("event", "path")]),
    ("'x' if params.dry else 'y'", [Ref("params", "dry")]),
    ("evnt.path", [Ref("evnt", "path")]),  # unknown roots are reported by the runbook layer
    ("[1, 2] | length", []),
    ("true and none is none", []),
])
def test_check_refs(source: str, refs: list[Ref]) -> None:
    assert sorted(ex.check(source), key=repr) == sorted(refs, key=repr)


@pytest.mark.parametrize("source", [
    "event.__class__", "event._private", "_x", "__builtins__", "event['__class__']",
    "params['__token']", "steps.a.__dict__", "event.path.__class__.__mro__",
    "''.__class__.__mro__[1].__subclasses__()", "event.__globals__", "event._SYSTEMD_UNIT",
])
def test_check_refuses_private_names(source: str) -> None:
    with pytest.raises(ExpressionSyntaxError, match="names starting with `__?` are private"):
        ex.check(source)


def test_a_field_starting_with_one_underscore_is_read_with_brackets() -> None:
    """journald's trusted fields (`_SYSTEMD_UNIT`, `_PID`) are data: brackets read them."""
    assert ex.check("event['_SYSTEMD_UNIT'] == 'nginx.service'") == [
        Ref("event", "_SYSTEMD_UNIT")]
    ctx = {"event": {"_SYSTEMD_UNIT": "nginx.service", "_PID": 42}}
    assert ex.evaluate("event['_SYSTEMD_UNIT']", ctx) == "nginx.service"
    assert ex.evaluate("event['_PID'] + 1", ctx) == 43
    with pytest.raises(ExpressionSyntaxError, match=r"read with brackets: \['_SYSTEMD_UNIT'\]"):
        ex.check("event._SYSTEMD_UNIT")


@pytest.mark.parametrize("source, words", [
    ("a = 1", "compare with `==`"),
    ("a ==", "unexpected end of the expression"),
    ("a && b", "write `and` / `or`"),
    ("a || b", "write `and` / `or`"),
    ("!a", "write `not x`"),
    ("a ? b : c", "a if condition else b"),
    ("${{ a }}", "without `${{ }}`"),
    ("'abc", "a text in quotes is never closed"),
    ("a b", "unexpected text after a complete expression"),
    ("{% if a %}", "cannot parse"),
    ("a.", "cannot parse"),
])
def test_syntax_errors_are_explained(source: str, words: str) -> None:
    with pytest.raises(ExpressionSyntaxError) as exc:
        ex.check(source)
    assert words in exc.value.message
    assert f"`{source}`" in exc.value.message


# ── evaluate ────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("source, value", [
    ("event.path", "/srv/drop/a b.csv"),
    ("event['path']", "/srv/drop/a b.csv"),
    ("event.labels.host", "web-1"),
    ("event['labels']['host']", "web-1"),
    ("event.tags[1]", "b"),
    ("event.tags | join(',')", "a,b"),
    ("steps.check.exit_code != 0", True),
    ("steps.check.outputs.v", "1.2"),
    ("steps.check.stdout | trim", "inactive"),
    ("params.n * 3", 6),
    ("params.n ** 10", 1024),
    ("'ab' * 3", "ababab"),
    ("params.service ~ '-1'", "web-1"),
    ("params.service | upper", "WEB"),
    ("event.path | basename", "a b.csv"),
    ("event.path | dirname", "/srv/drop"),
    ("'x' if params.dry else 'y'", "y"),
    ("event.count > 5 and event.source == 'file'", True),
    ("event.missing | default('none')", "none"),
    ("event.missing is defined", False),
    ("'{:>5}'.format(params.n)", "    2"),
    ("'%03d' % params.n", "002"),
    ("secrets.TOKEN", "s3cret"),
    ("run.id", "r-1"),
    # A field wins over the dict method of the same name.
    ("event.items", "the items field"),
    ("event.keys", 3),
    ("event.port | int", 8080),
    ("event.ratio | float", 0.25),
    ("event.path | int(-1)", -1),
    ("event.path | float(0)", 0),
    ("'ff' | int(base=16)", 255),
])
def test_evaluate(source: str, value: object) -> None:
    assert ex.evaluate(source, context()) == value


def test_a_key_that_looks_private_is_data_not_an_attribute() -> None:
    # Event data may have any keys; reading one is not attribute access on a Python object.
    # (The validator still refuses `event.__class__` written in a runbook.)
    ctx = {"event": {"__class__": "just data"}}
    assert ex.evaluate("event.__class__", ctx) == "just data"
    assert ex.evaluate("'{0.__class__}'.format(event)", ctx) == "just data"


@pytest.mark.parametrize("source, words", [
    ("event.path | int", "'/srv/drop/a b.csv' is not a whole number"),
    ("event.tags | int", "is not a whole number"),
    ("event.path | float", "is not a number"),
    ("'zz' | int(base=16)", "'zz' is not a whole number"),
])
def test_int_and_float_filters_do_not_silently_give_zero(source: str, words: str) -> None:
    with pytest.raises(ExpressionError) as exc:
        ex.evaluate(source, context())
    assert words in str(exc.value) and "give a fallback" in str(exc.value)


@pytest.mark.parametrize("source, words", [
    ("event.nope", "is not defined"),
    ("event.labels.nope", "is not defined"),
    ("steps.nope.exit_code", "there is no field 'nope'"),
    ("params.service.nope", "is not defined"),
    ("nope", "unknown name 'nope'"),
    ("nope.x", "unknown name 'nope'"),
    ("event.tags[5]", "is not defined"),
    ("event.path.nope", "is not defined"),
    ("event.nope ~ 'x'", "there is no field 'nope'"),
])
def test_undefined_raises_never_empty(source: str, words: str) -> None:
    with pytest.raises(ExpressionError) as exc:
        ex.evaluate(source, context())
    assert words in str(exc.value)
    assert "default(" in str(exc.value) or "unknown name" in str(exc.value)


def test_undefined_in_text_raises() -> None:
    with pytest.raises(ExpressionError):
        ex.render_text("path: ${{ event.nope }}", context())


# ── the sandbox ─────────────────────────────────────────────────────────────

ESCAPES = [
    "event.__class__",
    "''.__class__",
    "''['__class__']",
    "(1).__class__",
    "event.path.__class__.__mro__",
    "''.__class__.__mro__[1].__subclasses__()",
    "event.path.upper.__globals__",
    "event.path.__init__.__globals__",
    "steps.check.__dict__",
    "params|attr('__class__')",
    "event.path|attr('__class__')",
    "'{0.__class__}'.format(event)",
    "'{0.__class__.__mro__}'.format(params)",
    "'{0[__class__]}'.format(event.tags)",
    "''.format_map.__self__",
    "event.get.__self__",
    "lipsum.__globals__",
    "cycler.__init__.__globals__",
    "joiner.__init__",
    "namespace.__init__",
    "self.__init__.__globals__",
    "self._TemplateReference__context",
    "range(10)",
    "dict(a=1)",
    "config",
    "request",
    "self",
    "event.pop('path')",
    "params.update({'service': 'x'})",
    "event.tags.append('x')",
    "event.setdefault('x', 1)",
    "event.clear()",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_sandbox_refuses(source: str) -> None:
    ctx = context()
    before = copy.deepcopy(ctx)
    with pytest.raises((ExpressionError, ExpressionSyntaxError)):
        ex.evaluate(source, ctx)
    assert ctx == before  # nothing was changed, either


def test_private_attribute_message_says_not_allowed() -> None:
    with pytest.raises(ExpressionError, match="is not allowed: access to attribute '__class__'"):
        ex.evaluate("''.__class__", context())


@pytest.mark.parametrize("name", ["range", "lipsum", "cycler", "joiner", "namespace", "dict"])
def test_jinja_globals_are_not_available(name: str) -> None:
    with pytest.raises(ExpressionError, match=f"unknown name '{name}'"):
        ex.evaluate(name, context())


@pytest.mark.parametrize("source", [
    "event.get", "event.values", "''.format", "event.path.upper", "event.path.split",
])
def test_callables_are_refused_as_values(source: str) -> None:
    with pytest.raises(ExpressionError, match="is a function, not a value"):
        ex.evaluate(source, context())


@pytest.mark.parametrize("source, words", [
    ("'x' * 10**7", "the limit is 1,000,000"),
    ("[1] * 2000000", "the limit is 1,000,000"),
    ("(event.tags|list) * 600000", "the limit is 1,000,000"),
    ("[event.path] * 100000", "the limit is 1,000,000"),
    ("10**7 * 'x'", "the limit is 1,000,000"),
    ("2 ** 10000", "exponent too large"),
    ("(10 ** 100) ** 100", "too large a number"),
    ("(2 ** 999) * (2 ** 999) * (2 ** 999) * (2 ** 999) * (2 ** 999)", "too large a number"),
    ("1e200 ** 2", "base too large"),
    ("'{:>99999999}'.format(1)", "format width over 1,000,000"),
    ("'{:>{}}'.format(1, 99999999)", "width taken from a value"),
    ("'%999999999d' % 1", "format width over 1,000,000"),
    ("'%*d' % (99999999, 1)", "width taken from a value"),
    ("'x'.center(999999999)", "over 1,000,000 characters"),
    ("'x'.ljust(10**8)", "over 1,000,000 characters"),
    ("'1'.zfill(10**8)", "over 1,000,000 characters"),
    ("('\\t' * 1000).expandtabs(100000)", "over 1,000,000 characters"),
])
def test_bounded_results(source: str, words: str) -> None:
    with pytest.raises(ExpressionError, match=words.replace("(", r"\(").replace("*", r"\*")):
        ex.evaluate(source, context())


def test_within_bounds_works() -> None:
    assert len(ex.evaluate("'x' * 1000000", context())) == 1_000_000
    assert ex.evaluate("2 ** 1000", context()) == 2 ** 1000
    assert ex.evaluate("'x'.center(5)", context()) == "  x  "


def test_errors_from_python_become_expression_errors() -> None:
    for source in ("1 / 0", "'a' + 1", "event.path | int(base=99)", "event.path()",
                   "event.tags + 'x'", "event.path.split(1)"):
        with pytest.raises(ExpressionError) as exc:
            ex.evaluate(source, context())
        assert source in str(exc.value)


def test_truthy() -> None:
    assert ex.truthy("steps.check.exit_code != 0", context()) is True
    assert ex.truthy("params.dry", context()) is False
    assert ex.truthy("event.tags", context()) is True


# ── to_text and render_text ─────────────────────────────────────────────────

@pytest.mark.parametrize("value, text", [
    (None, ""),
    (True, "true"),
    (False, "false"),
    (0, "0"),
    (-12, "-12"),
    (1.5, "1.5"),
    (float("inf"), "inf"),
    ("text", "text"),
    ("", ""),
    ([1, "a", None, True], '[1,"a",null,true]'),
    ((1, 2), "[1,2]"),
    ({"k": "é", "n": [1]}, '{"k":"é","n":[1]}'),
    ({"when": __import__("datetime").date(2024, 1, 2)}, '{"when":"2024-01-02"}'),
])
def test_to_text(value: object, text: str) -> None:
    assert ex.to_text(value) == text


def test_render_text() -> None:
    out = ex.render_text("restart ${{ params.service }} on ${{ event.labels.host }} "
                         "({{ not ours }}) ${{ event.tags }} ${{ params.dry }}", context())
    assert out == 'restart web on web-1 ({{ not ours }}) ["a","b"] false'


def test_render_text_syntax_error_is_an_expression_error() -> None:
    with pytest.raises(ExpressionError, match="never closed"):
        ex.render_text("x ${{ params.n", context())
