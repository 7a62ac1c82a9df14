"""Property-based tests: hostile input to the parsers never crashes them, and what they
accept they get right.

Each parser either answers correctly or raises its own documented error (an OpsrunError,
or the module's error type that the callers turn into one: YamlError, EventRejected,
CriteriaError, ExpressionSyntaxError, ShellContextError, ParamError, DurationError) —
never anything else, which would reach the user as an "internal error". Where a result is
given, it is checked against a property: a round trip, a naive reference implementation,
or a real bash reading the rendered script.

Settings are modest and derandomized, so CI sees the same examples on every run.
"""
from __future__ import annotations

import fnmatch
import io
import json
import os
import re
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opsrun import criteria, expressions, params, shell_words, terminal_text
from opsrun.durations import DurationError, parse_duration
from opsrun.errors import ExpressionError, RunbookInvalid
from opsrun.event import Event, EventRejected, check_object, parse_json_event
from opsrun.matcher import Matcher
from opsrun.runbook import EventTrigger, Runbook, load_runbook_bytes
from opsrun.sources.stdin_json import Rejection, read_events
from opsrun.yaml_load import YamlError, load_bytes, load_text

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.filter_too_much])
FEW = settings(SETTINGS, max_examples=40)

# Pieces of text an attacker would try, mixed into generated text.
SNIPPETS = [
    "; touch /tmp/opsrun-canary", "$(id)", "`id`", "${IFS}", "&&", "||", "|", ">", "<<EOF",
    "EOF", "'", '"', "\\", "\n", "\r", "\t", "\x00", "\x1b[2J", "\x1b]0;pwned\x07",
    "\x1b[31m", "\x9b31m", "\x07", "\x7f", "\u202e", "\u2028", "${{ 7*7 }}", "{{ 7*7 }}",
    "{% for %}", "%s%n", "{0}", "__class__", "*", "?", "[", "~", "-rf", "--help", "$'\\x3b'",
    "\ufeff", "é", "𝕏", "＄(id)", "١", "²", "0x10", "1e999", "NaN", "null", "true", "",
]
hostile_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(SNIPPETS),
    st.lists(st.one_of(st.sampled_from(SNIPPETS), st.text(max_size=5)), max_size=6)
    .map("".join),
)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                         st.floats(allow_nan=False, allow_infinity=False), hostile_text)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(hostile_text, inner, max_size=4)),
    max_leaves=16)


def _no_surrogates(text: str) -> bool:
    return not any(0xD800 <= ord(c) <= 0xDFFF for c in text)


# ── events ─────────────────────────────────────────────────────────────────

@SETTINGS
@given(st.one_of(st.binary(max_size=300), hostile_text.map(str.encode),
                 json_values.map(lambda v: json.dumps(v).encode()),
                 st.sampled_from([b'{"a": NaN}', b'{"a": -Infinity}', b'{"a": 1e400}',
                                  b'{"a": "\\udc80"}', b'{"a": "\\ud83d\\ude00"}',
                                  b'{"a": ' + b"9" * 5000 + b"}", b"[" * 100 + b"]" * 100,
                                  b'{"a":' * 70 + b"1" + b"}" * 70, b"\xff\xfe{}",
                                  b'{"\\u0000": 1}', b"{}" + b" " * 10])))
def test_event_parser_rejects_or_accepts_cleanly(raw: bytes) -> None:
    try:
        event = parse_json_event(raw)
    except EventRejected as e:
        assert str(e)
        return
    # What is accepted can be stored, audited and given to a command: it encodes as UTF-8
    # JSON without NaN, and reads back the same.
    text = json.dumps(dict(event.data), ensure_ascii=False, allow_nan=False)
    text.encode("utf-8")
    assert json.loads(text) == dict(event.data)
    assert isinstance(event.data["id"], (str, int)) and event.id


@SETTINGS
@given(st.dictionaries(hostile_text.filter(lambda k: k != "id"), json_values, max_size=6),
       st.booleans())
def test_event_round_trip(obj: dict[str, Any], ascii_only: bool) -> None:
    event = parse_json_event(json.dumps(obj, ensure_ascii=ascii_only))
    for key, value in obj.items():
        assert json.dumps(event.data[key], sort_keys=True) == json.dumps(value, sort_keys=True)
    assert json.loads(event.to_json()) == dict(event.data)
    assert {"id", "time", "source"} <= set(event.data)
    check_object(event.data)  # what parses passes the control socket's check too


class _Chunked(io.RawIOBase):
    """A stream that hands out its bytes in the given chunk sizes."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data, self.sizes, self.pos = data, sizes, 0

    def read(self, n: int = -1) -> bytes:
        size = self.sizes.pop(0) if self.sizes else n
        out = self.data[self.pos:self.pos + max(1, min(size, n if n > 0 else size))]
        self.pos += len(out)
        return out


lines = st.lists(st.one_of(
    st.dictionaries(st.sampled_from(["a", "b", "id", "time"]), json_scalars, max_size=3)
    .map(lambda d: json.dumps(d)),
    hostile_text.filter(lambda t: "\n" not in t), st.just(""), st.just("  "),
    st.just("[1, 2]"), st.just('{"a": 1}\r')), max_size=8)


@SETTINGS
@given(lines, st.lists(st.integers(1, 40), max_size=30), st.booleans())
def test_json_lines_do_not_depend_on_how_input_arrives(
        texts: list[str], sizes: list[int], final_newline: bool) -> None:
    data = "\n".join(texts).encode("utf-8", "surrogatepass") + (b"\n" if final_newline else b"")

    def shape(items: list[Event | Rejection]) -> list[Any]:
        return [(i.lineno, i.reason) if isinstance(i, Rejection) else
                {k: v for k, v in i.data.items() if k not in ("id", "time")} for i in items]

    whole = shape(list(read_events(io.BytesIO(data))))
    assert shape(list(read_events(_Chunked(data, sizes)))) == whole  # type: ignore[arg-type]
    # The naive reference: split on newlines, skip blank lines, parse each one.
    expected: list[Any] = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        raw = raw[:-1] if raw.endswith(b"\r") else raw
        if not raw.strip():
            continue
        try:
            expected.append(parse_json_event(raw))
        except EventRejected as e:
            expected.append(Rejection(lineno, str(e), ""))
    assert whole == shape(expected)


# ── criteria and the matcher ───────────────────────────────────────────────

PATHS = ["a", "b", "a.b", "a.0", "l.1", "l.x", "n.b.c", "a.²"]
VALUES = [0, 1, 1.0, 2.5, -1, True, False, None, "1", "a", "ab", "b", "x*", "", [1],
          [0, 1], {"b": 1}, {"c": "a"}]
ops_values = st.one_of(
    st.tuples(st.sampled_from(["eq", "ne", "contains"]), st.sampled_from(VALUES)),
    st.tuples(st.sampled_from(["in", "not_in"]), st.lists(st.sampled_from(VALUES), max_size=3)),
    st.tuples(st.just("regex"), st.sampled_from(["^a", "b$", "a|1", r"\d", ""])),
    st.tuples(st.just("glob"), st.sampled_from(["a*", "*b", "?", "[ab]", "x*"])),
    st.tuples(st.sampled_from(["gt", "gte", "lt", "lte"]),
              st.sampled_from([0, 1, 1.5, -1, "a", "b", ""])),
    st.tuples(st.just("exists"), st.booleans()),
)
wheres = st.dictionaries(st.sampled_from(PATHS), st.one_of(
    st.sampled_from(VALUES).filter(lambda v: not isinstance(v, dict)),
    st.lists(ops_values, min_size=1, max_size=2).map(dict)), min_size=1, max_size=3)
event_values = st.recursive(st.sampled_from(VALUES), lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["a", "b", "c", "0", "1", "x"]), inner, max_size=3)),
    max_leaves=8)
events = st.dictionaries(st.sampled_from(["a", "b", "l", "n", "x"]), event_values, max_size=4)

_MISSING = object()


def ref_lookup(data: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if isinstance(data, dict):
            if part not in data:
                return _MISSING
            data = data[part]
        elif isinstance(data, list) and re.fullmatch("[0-9]+", part) and \
                int(part) < len(data):
            data = data[int(part)]
        else:
            return _MISSING
    return data


def ref_norm(v: Any) -> Any:
    """A JSON value as a comparable key: 1 and 1.0 alike, true and 1 apart."""
    if isinstance(v, bool):
        return ("bool", v)
    if isinstance(v, (int, float)):
        return ("num", v)
    if isinstance(v, list):
        return ("list", tuple(ref_norm(x) for x in v))
    if isinstance(v, dict):
        return ("map", frozenset((k, ref_norm(x)) for k, x in v.items()))
    return (type(v).__name__, v)


def ref_holds(op: str, actual: Any, value: Any) -> bool:
    if op == "exists":
        return (actual is not _MISSING) == value
    if actual is _MISSING:
        return False
    same = lambda a, b: ref_norm(a) == ref_norm(b)  # noqa: E731
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    if op in ("eq", "ne"):
        return same(actual, value) == (op == "eq")
    if op in ("in", "not_in"):
        return any(same(actual, v) for v in value) == (op == "in")
    if op == "regex":
        return isinstance(actual, str) and re.search(value, actual) is not None
    if op == "glob":
        return isinstance(actual, str) and fnmatch.fnmatchcase(actual, value)
    if op == "contains":
        if isinstance(actual, list):
            return any(same(x, value) for x in actual)
        return isinstance(actual, (str, dict)) and isinstance(value, str) and value in actual
    if not ((number(actual) and number(value)) or
            (isinstance(actual, str) and isinstance(value, str))):
        return False
    return {"gt": actual > value, "gte": actual >= value, "lt": actual < value,
            "lte": actual <= value}[op]


def ref_matches(where: dict[str, Any], data: dict[str, Any]) -> bool:
    for key, spec in where.items():
        pairs = spec.items() if isinstance(spec, dict) else [("eq", spec)]
        actual = ref_lookup(data, tuple(key.split(".")))
        if not all(ref_holds(op, actual, value) for op, value in pairs):
            return False
    return True


@SETTINGS
@given(wheres, events)
def test_criteria_agree_with_a_naive_reference(where: dict[str, Any],
                                               data: dict[str, Any]) -> None:
    assert criteria.matches(criteria.parse_where(where), data) == ref_matches(where, data)


def _runbook(name: str, triggers: list[dict[str, Any]]) -> Runbook:
    return Runbook(name, Path(f"/rb/{name}.yaml"), "0" * 64, (), triggers=tuple(
        EventTrigger(criteria.parse_where(w)) for w in triggers))


@SETTINGS
@given(st.lists(st.lists(wheres, min_size=1, max_size=2), min_size=1, max_size=6),
       st.lists(events, min_size=1, max_size=5))
def test_matcher_equals_trying_every_runbook(triggers: list[list[dict[str, Any]]],
                                             datas: list[dict[str, Any]]) -> None:
    runbooks = [_runbook(f"rb{i}", ts) for i, ts in enumerate(triggers)]
    matcher = Matcher(runbooks)
    for data in datas:
        got = [m.runbook.name for m in matcher.match(Event("json", data))]
        want = [rb.name for rb, ts in zip(runbooks, triggers)
                if any(ref_matches(w, data) for w in ts)]
        assert got == want, data


@SETTINGS
@given(st.dictionaries(hostile_text, st.one_of(
    json_values, st.dictionaries(st.one_of(st.sampled_from(criteria.OPERATORS), hostile_text),
                                 json_values, max_size=3)), max_size=4),
    st.dictionaries(hostile_text, json_values, max_size=4))
def test_any_where_is_criteria_or_a_clear_error(where: dict[str, Any],
                                                data: dict[str, Any]) -> None:
    try:
        parsed = criteria.parse_where(where)
    except criteria.CriteriaError as e:
        assert e.message
        return
    assert isinstance(criteria.matches(parsed, data), bool)


# ── expressions ────────────────────────────────────────────────────────────

TOKENS = [
    "event", "event.v", "event.n", "event['v']", "event.items", "event.l", "event.l[0]",
    "params.p", "params", "env.HOME", "steps", "secrets", "run.id", "nothing", "self",
    "'x'", '"y"', "''", "0", "1", "-1", "2.5", "10**9", "999999", "true", "none", "[1, 2]",
    "{'a': 1}", "+", "-", "*", "/", "//", "%", "**", "~", "==", "!=", "<", ">=", "and", "or",
    "not", "in", "if", "else", "is", "defined", "(", ")", "[", "]", ",", ".", ":", "|",
    "int", "float", "default('d')", "length", "upper", "join(',')", "replace('a', 'b')",
    "tojson", "first", "sort", "center(10**8)", "int(0)", "format", "format(1)",
    "__class__", "mro()", "__subclasses__()", ".__globals__", "attr('__class__')",
    "range(10**9)", "lipsum", "cycler", "'%s' % 1", "'{}'.format", "'{:>999999999}'",
    "'%999999999d'", "'a' * 10**7", "[0] * 10**8", "'x'.ljust(10**9)", "\\", "'\n'", "=",
    "&&", "!", "?", "{{", "}}", "${{", "#", "{%", "%}",
]
contexts = st.fixed_dictionaries({
    "event": st.fixed_dictionaries({"v": hostile_text, "n": st.integers(-5, 5),
                                    "l": st.lists(hostile_text, max_size=3),
                                    "items": hostile_text}),
    "params": st.fixed_dictionaries({"p": st.one_of(hostile_text, st.integers(), st.none())}),
    "env": st.just({"HOME": "/root"}),
    "steps": st.just({}),
    "run": st.just({"id": "01ABC"}),
    "secrets": st.just({"TOKEN": "hunter2-secret"}),
})


@SETTINGS
@given(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=7).map(" ".join), contexts)
def test_expressions_answer_or_fail_clearly(source: str, context: dict[str, Any]) -> None:
    try:
        expressions.check(source)
    except expressions.ExpressionSyntaxError as e:
        assert e.message
    try:
        value = expressions.evaluate(source, context)
    except (ExpressionError, expressions.ExpressionSyntaxError) as e:
        assert str(e)
        return
    text = expressions.to_text(value)  # whatever comes out can be put into text
    assert isinstance(text, str) and len(text) <= 2 * expressions.MAX_RESULT_CHARS


@SETTINGS
@given(st.integers(-10**6, 10**6), st.integers(-10**6, 10**6), st.integers(-50, 50))
def test_arithmetic_is_python_arithmetic(a: int, b: int, c: int) -> None:
    ctx = {"params": {"a": a, "b": b, "c": c}}
    assert expressions.evaluate("params.a + params.b * params.c", ctx) == a + b * c
    assert expressions.evaluate("params.a - params.b", ctx) == a - b
    assert expressions.evaluate("params.a < params.b or params.c == 0", ctx) == \
        (a < b or c == 0)
    if b:
        assert expressions.evaluate("params.a // params.b", ctx) == a // b
        assert expressions.evaluate("params.a % params.b", ctx) == a % b


@SETTINGS
@given(hostile_text)
def test_rendered_text_is_the_value_never_template_syntax(value: str) -> None:
    ctx = {"event": {"v": value}}
    assert expressions.render_text("<${{ event.v }}>", ctx) == f"<{value}>"
    assert expressions.evaluate("event.v", ctx) == value
    assert expressions.evaluate("event.v ~ event.v", ctx) == value + value


@SETTINGS
@given(st.lists(st.one_of(st.sampled_from(["${{", "}}", "${{ event.v }}", "'", '"', "\\",
                                           "$", "{", "}", " "]), hostile_text), max_size=8)
       .map("".join))
def test_splitting_templates_never_crashes(text: str) -> None:
    try:
        parts = expressions.split(text)
    except expressions.ExpressionSyntaxError as e:
        assert e.message and 0 <= e.offset <= len(text)
        return
    literal = "".join(p for p in parts if isinstance(p, str))
    assert len(literal) <= len(text)


# ── shell words through a real bash ────────────────────────────────────────

SCRIPT = textwrap.dedent("""\
    printf '%s\\0' ${{ event.v }}
    printf '%s\\0' "d:${{ event.v }}:"
    printf '%s\\0' 's:${{ event.v }}:'
    printf '%s\\0' pre${{ event.v }}post
    cat <<EOF
    ${{ event.v }}
    EOF
    cat <<-EOF
    \t${{ event.v }}
    \tEOF
    """)
PLAN = shell_words.plan(SCRIPT)
shell_values = st.one_of(hostile_text, st.text(alphabet=st.characters(
    codec="utf-8", exclude_characters="\x00"), max_size=40)).filter(
    lambda v: "\x00" not in v and _no_surrogates(v))


def _bash(script: str, env: dict[str, str]) -> bytes:
    done = subprocess.run(["bash", "-c", script], env={"PATH": os.environ["PATH"], **env},
                          capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


@FEW
@given(shell_values)
def test_values_reach_bash_as_one_word_of_data(value: str) -> None:
    rendered = shell_words.render_with(PLAN, {"event": {"v": value}})
    want = b"\0".join(x.encode() for x in (value, f"d:{value}:", f"s:{value}:",
                                           f"pre{value}post")) + b"\0" + \
        f"{value}\n{value}\n".encode()
    assert _bash(rendered.script, rendered.env) == want
    # What a person is shown (dry run, audit log) runs to the same effect.
    assert _bash(rendered.display, {}) == want


@SETTINGS
@given(st.lists(st.one_of(st.sampled_from([
    "${{ event.v }}", "'", '"', "`", "$(", ")", "${", "}", "$((", "))", "<<EOF\n", "<<'EOF'\n",
    "\nEOF\n", "\\", "#", "\n", "$'", " ", ";", "<<-X\n"]), hostile_text), max_size=10)
    .map("".join))
def test_any_script_plans_or_is_refused_clearly(text: str) -> None:
    try:
        plan = shell_words.plan(text)
    except shell_words.ShellContextError as e:
        assert e.message and 0 <= e.offset <= len(text)
        return
    try:
        rendered = shell_words.render_with(plan, {"event": {"v": "x"}})
    except ExpressionError as e:
        assert str(e)
        return
    slots = [p for p in plan.parts if isinstance(p, shell_words.Slot)]
    assert len(rendered.env) == len(slots) and "${{" not in rendered.script


# ── YAML and runbooks ──────────────────────────────────────────────────────

@SETTINGS
@given(st.one_of(st.binary(max_size=200), hostile_text.map(str.encode),
                 st.lists(st.sampled_from([
                     "a: 1\n", "- x\n", "  ", ": ", "&a ", "*a ", "!!python/object ", "<<: ",
                     "{", "}", "[", "]", "'", '"', "\t", "---\n", "? ", "|\n", "%YAML 1.1\n",
                     "!!binary ", "\n", "#", "key", "\\", "@", "`"]), max_size=12)
                 .map(lambda x: "".join(x).encode()),
                 st.sampled_from([b"!\n---", b"a: 1\n---", b"- a\n--- \n...", b"&a [*a]"])))
def test_any_bytes_load_or_fail_with_a_position(raw: bytes) -> None:
    try:
        load_bytes(raw)
    except YamlError as e:
        assert e.message and e.line >= 0 and e.col >= 0


class _QuotedDumper(yaml.SafeDumper):
    """Writes every text double-quoted, so that YAML 1.1 and 1.2 read it alike."""


_QuotedDumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style='"'))
yaml_data = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
              st.text(alphabet=st.characters(codec="utf-8"), max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20)


@SETTINGS
@given(yaml_data.filter(lambda d: d is not None and d != ""))
def test_yaml_round_trip(data: Any) -> None:
    text = yaml.dump({"k": data}, Dumper=_QuotedDumper, allow_unicode=True)
    assert load_text(text).data == {"k": data}


RUNBOOK_KEYS = ["name", "description", "on", "params", "env", "concurrency", "throttle",
                "timeout", "steps", "on_failure", "on_denied", "bogus"]
STEP_KEYS = ["id", "name", "run", "confirm", "if", "env", "timeout", "retry",
             "continue_on_error", "hosts", "parallel", "workdir", "shell", "approvers",
             "on_timeout", "uses", "with"]
leaf = st.one_of(hostile_text, st.integers(-3, 10**6), st.booleans(), st.none(),
                 st.sampled_from(["30s", "1h30m", "-1s", "0", "bash", "sh", "deny", "approve",
                                  "echo ${{ event.v }}", "${{ params.p }}", "${{ steps.a.x }}",
                                  "event.v == 'x'", "${{ secrets.T }}", "*/5 * * * *",
                                  "Europe/Berlin", "Mars/Base", "[", "(?P<x>a)", "queue",
                                  "skip", "a", "A-B", "/tmp/*.log", "group:ops"]))
values = st.recursive(leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(
        st.sampled_from(["type", "default", "required", "pattern", "choices", "attempts",
                         "delay", "backoff", "users", "groups", "not_starter", "key",
                         "policy", "once_within", "once_after", "paths", "events",
                         "debounce", "ignore", "cron",
                         "timezone", "catch_up", "jitter", "path", "match", "from", "where",
                         "file", "schedule", "log", "event", "in", "regex", "eq", "exists"]),
        hostile_text), inner, max_size=3)), max_leaves=10)
steps = st.lists(st.dictionaries(st.sampled_from(STEP_KEYS), values, max_size=4), max_size=3)
documents = st.dictionaries(st.sampled_from(RUNBOOK_KEYS), values, max_size=6).flatmap(
    lambda d: st.fixed_dictionaries({**{k: st.just(v) for k, v in d.items()},
                                     "steps": st.one_of(steps, values)}))


def _load_or_problems(raw: bytes) -> None:
    try:
        rb = load_runbook_bytes(raw, Path("/rb/hostile.yaml"))
    except RunbookInvalid as e:
        assert e.problems
        for p in e.problems:
            assert p.message and p.file == "/rb/hostile.yaml" and p.line >= 0 and p.col >= 0
        return
    assert rb.steps and rb.name


@SETTINGS
@given(documents)
def test_any_runbook_document_loads_or_lists_its_problems(doc: dict[str, Any]) -> None:
    _load_or_problems(yaml.safe_dump(doc, allow_unicode=True).encode())


EXAMPLE = (Path(__file__).resolve().parent.parent / "runbooks" / "deploy.yaml").read_bytes()


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, len(EXAMPLE)), st.integers(0, 8),
                          st.one_of(st.binary(max_size=6),
                                    st.sampled_from([b":", b"-", b" ", b"\n", b"${{", b"}}",
                                                     b"'", b'"', b"\t", b"*a", b"&a"]))),
                min_size=1, max_size=4))
def test_a_mangled_runbook_loads_or_lists_its_problems(edits: list[tuple[int, int, bytes]]
                                                        ) -> None:
    raw = EXAMPLE
    for at, cut, insert in edits:
        raw = raw[:at] + insert + raw[at + cut:]
    _load_or_problems(raw)


@SETTINGS
@given(st.fixed_dictionaries({
    "name": st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True),
    "description": st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]),
                           min_size=1, max_size=30).filter(str.strip),
    "steps": st.lists(st.fixed_dictionaries({
        "id": st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True),
        "run": st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]),
                       min_size=1, max_size=40).filter(lambda t: "${{" not in t and t.strip())}),
        min_size=1, max_size=4, unique_by=lambda s: s["id"])}))
def test_a_valid_runbook_keeps_what_it_says(doc: dict[str, Any]) -> None:
    raw = yaml.dump(doc, Dumper=_QuotedDumper, allow_unicode=True).encode()
    try:
        rb = load_runbook_bytes(raw, Path("/rb/gen.yaml"))
    except RunbookInvalid as e:
        # Only the shell-quoting checks may refuse a generated script (say, a lone quote
        # before where an expression could go); none of these scripts has one.
        pytest.fail(f"valid runbook refused: {e}\n{raw.decode()}")
    assert rb.name == doc["name"] and rb.description == doc["description"]
    assert [(s.id, s.run) for s in rb.steps] == [(s["id"], s["run"]) for s in doc["steps"]]


# ── params, durations, terminal text ───────────────────────────────────────

@SETTINGS
@given(st.sampled_from(["string", "int", "float", "bool", "choice"]), hostile_text,
       st.sampled_from([None, "^[a-z-]+$", ".*"]))
def test_param_values_are_typed_or_refused(kind: str, text: str, pattern: str | None) -> None:
    p = params.Param("p", kind, pattern=pattern, choices=("a", "b") if kind == "choice" else ())
    try:
        value = params.resolve({"p": p}, {"p": text})["p"]
    except params.ParamError as e:
        assert str(e).startswith("param 'p'")
        return
    expected = {"string": str, "int": int, "float": float, "bool": bool, "choice": str}[kind]
    assert type(value) is expected
    if kind in ("string", "choice"):
        assert value == text


@SETTINGS
@given(st.one_of(hostile_text, st.from_regex(r"\d{1,30}(\.\d{0,5})?(ms|s|m|h|d){1,3}",
                                             fullmatch=True),
                 st.floats(), st.integers()))
def test_durations_parse_or_say_what_to_write(value: Any) -> None:
    try:
        seconds = parse_duration(value)
    except DurationError as e:
        assert str(e)
        return
    assert seconds >= 0 and seconds == seconds and seconds != float("inf")


_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
                     r"\u2028\u2029]")


@SETTINGS
@given(hostile_text, st.booleans())
def test_safe_text_cannot_drive_a_terminal(text: str, keep_newlines: bool) -> None:
    out = terminal_text.safe(text, keep_newlines=keep_newlines)
    assert not _UNSAFE.search(out)
    if not keep_newlines:
        assert "\n" not in out and "\t" not in out
    if not _UNSAFE.search(text) and (keep_newlines or ("\n" not in text and "\t" not in text)):
        assert out == text  # ordinary text is left as it is
