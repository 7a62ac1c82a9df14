"""The runbook format (DESIGN section 2) as data: validation and the JSON Schema both come from here."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from opsrun import criteria as criteria_mod
from opsrun import expressions, journal_entries
from opsrun.inventory import PASSWORD_KEYS
from opsrun.notify.targets import TARGETS as NOTIFY_TARGETS
from opsrun.schema_checks import (
    INVALID,
    Alternatives,
    Anything,
    Boolean,
    Check,
    Custom,
    Duration,
    Enum,
    Field,
    Integer,
    Lazy,
    ListOf,
    MapOf,
    Number,
    Object,
    PathT,
    PositionedError,
    Problems,
    Text,
    show_path,
)
from opsrun.suggest import did_you_mean

NAME_RE = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
IDENT_RE = r"[A-Za-z][A-Za-z0-9_]*"
ENV_RE = r"[A-Za-z_][A-Za-z0-9_]*"
SCHEMA_ID = "https://opsrun.dev/schema/runbook.schema.json"


# ── single values ───────────────────────────────────────────────────────────

def _check_expression(text: str) -> str:
    try:
        expressions.check(text)
    except expressions.ExpressionSyntaxError as e:
        raise ValueError(e.message) from None
    return text


def _check_template(text: str) -> str:
    try:
        for part in expressions.split(text):
            if isinstance(part, expressions.Expr):
                expressions.check(part.source)
    except expressions.ExpressionSyntaxError as e:
        raise ValueError(e.message) from None
    return text


def _check_regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as e:
        raise PositionedError(f"bad regular expression `{text}`: {e}",
                              e.pos if e.pos is not None else -1) from None
    return text


def _check_cron(text: str) -> str:
    from opsrun.cron import check

    check(text)
    return text


def _check_timezone(text: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        from zoneinfo import available_timezones

        if re.fullmatch(r"[A-Z]{3,5}", text):
            # CEST, PST, IST…: abbreviations are ambiguous and change with daylight saving.
            raise ValueError(f"unknown time zone {text!r}: abbreviations are ambiguous and "
                             "change with daylight saving time; use the IANA name of a "
                             "place, like Europe/Berlin or America/Los_Angeles") from None
        hint = did_you_mean(text, available_timezones())
        raise ValueError(f"unknown time zone {text!r}{hint}; use an IANA name like UTC, "
                         "Europe/Berlin or America/New_York") from None
    return text


def _check_glob(text: str) -> str:
    if "\x00" in text:
        raise ValueError("a path cannot contain a NUL byte")
    return text


EXPRESSION = Custom(_check_expression, expects="an expression",
                    description="An expression, like steps.check.exit_code != 0")
TEMPLATE = Custom(_check_template, expects="a text",
                  description="Text; ${{ … }} inserts the value of an expression")
REGEX = Custom(_check_regex, expects="a regular expression",
               description="A Python regular expression; named groups (?P<name>…) "
                           "become event fields")
PARAM_PATTERN = Custom(_check_regex, expects="a regular expression",
                       description="A Python regular expression the whole value must match")
GLOB = Custom(_check_glob, expects="a path or glob")


class Criteria(Check):
    """`where:` — dotted field paths, each a value (equality) or an operator map."""

    expects = "a mapping of field paths to values or operators"
    description = ("Conditions on the event: field path → value (equal) or "
                   "{operator: value}; operators: " + ", ".join(criteria_mod.OPERATORS)
                   + "; any: [...], all: [...] and not: {...} combine them")

    def check(self, value: Any, path: PathT, problems: Problems) -> Any:
        if not isinstance(value, Mapping):
            return self.wrong_type(value, path, problems)
        ok = True
        for key, spec in value.items():
            try:
                criteria_mod.parse_where({key: spec})
            except criteria_mod.CriteriaError as e:
                # Named by the condition's field; marked at its operator or value.
                field = e.key[:-1] if e.at_key and len(e.key) > 1 else e.key
                problems.add((*path, *e.key), f"{show_path((*path, *field))}: {e.message}",
                             at_key=e.at_key)
                ok = False
        return dict(value) if ok else INVALID

    def schema(self) -> dict[str, Any]:
        ops: dict[str, Any] = {op: {} for op in criteria_mod.OPERATORS}
        ops.update({"in": {"type": "array"}, "not_in": {"type": "array"},
                    "regex": {"type": "string"}, "glob": {"type": "string"},
                    "exists": {"type": "boolean"}})
        operator_map = {"type": "object", "properties": ops, "additionalProperties": False,
                        "minProperties": 1}
        nested = {"type": "object", "minProperties": 1}  # conditions again (not spelt out)
        return self._with_description({
            "type": "object",
            "properties": {
                "any": {"type": "array", "items": nested, "minItems": 1,
                        "description": "One of these mappings of conditions must hold"},
                "all": {"type": "array", "items": nested, "minItems": 1,
                        "description": "Each of these mappings of conditions must hold"},
                "not": {"anyOf": [nested, {"type": "array", "items": nested}],
                        "description": "These conditions must not (all) hold"},
            },
            "additionalProperties": {"anyOf": [operator_map,
                                               {"type": ["string", "number", "boolean",
                                                         "null", "array"]}]},
        })


ENV = MapOf(Text(scalars=True, nonempty=False), key_pattern=ENV_RE,
            key_hint="environment variable names are letters, digits and _, "
                     "not starting with a digit",
            description="Environment variables for the steps; values may use ${{ … }}")


# ── triggers ────────────────────────────────────────────────────────────────

FILE_EVENTS = ("added", "modified", "deleted")

FILE_TRIGGER = Object("a file trigger", {
    "paths": Field(ListOf(GLOB, min_items=1, single_ok=True,
                          description="Files or globs to watch (** matches folders)"),
                   required=True),
    "events": Field(ListOf(Enum(*FILE_EVENTS, synonyms={
        "created": "added", "create": "added", "new": "added", "changed": "modified",
        "change": "modified", "updated": "modified", "written": "modified",
        "removed": "deleted", "remove": "deleted", "delete": "deleted"}),
        min_items=1, single_ok=True,
                           description="Which changes fire: added, modified, deleted"),
                    default=list(FILE_EVENTS)),
    "debounce": Field(Duration(description="Quiet time before firing (default 50ms)"),
                      default=0.05),
    "ignore": Field(ListOf(GLOB, single_ok=True, description="Globs of paths to ignore",
                           expects='a list of globs, like ["*.tmp", "**/.git/**"]'),
                    default=[]),
}, description="Fire when files change.")

SCHEDULE_TRIGGER = Object("a schedule trigger", {
    "cron": Field(Custom(_check_cron, expects="a cron expression",
                         description="5 fields (minute hour day month weekday), "
                                     "6 with seconds first, or @daily/@hourly/…"),
                  required=True),
    "timezone": Field(Custom(_check_timezone, expects="a time zone",
                             description="IANA time zone (default UTC)"), default="UTC"),
    "catch_up": Field(Enum("none", "last", description="After downtime: none, or run the "
                                                      "last missed fire once"),
                      default="none"),
    "jitter": Field(Duration(description="Random delay up to this long"), default=0.0),
}, description="Fire on a cron schedule.")

LOG_TRIGGER = Object("a log trigger", {
    "path": Field(Custom(_check_glob, expects="a path",
                         description="The log file to follow (a glob follows each match)"),
                  required=True),
    "match": Field(REGEX, default=None),
    "from": Field(Enum("end", "start", description="Start at the end (new lines only) "
                                                   "or the start of the file",
                       synonyms={"beginning": "start", "begin": "start", "head": "start",
                                 "top": "start", "tail": "end", "bottom": "end"}),
                  default="end"),
}, description="Fire on each new log line that matches.")

class Priority(Check):
    """`priority:` of a journal trigger: a level name or 0–7, this level or more severe."""

    expects = "a priority like err or 3"
    description = ("This level or more severe: emerg (0), alert, crit, err, warning, notice, "
                   "info, debug (7)")

    def check(self, value: Any, path: PathT, problems: Problems) -> Any:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return self.wrong_type(value, path, problems)
        try:
            return journal_entries.parse_priority(value)
        except ValueError as e:
            problems.add(path, f"{show_path(path)}: {e}")
            return INVALID

    def schema(self) -> dict[str, Any]:
        return self._with_description({"anyOf": [
            {"type": "integer", "minimum": 0, "maximum": 7},
            {"type": "string", "enum": [*journal_entries.PRIORITIES,
                                        *journal_entries.PRIORITY_SYNONYMS]}]})


class JournalFields(Check):
    """`fields:` of a journal trigger: journal field → exact value (or a list: any of them)."""

    expects = "a mapping of journal fields to values, like {SYSLOG_IDENTIFIER: sshd}"
    description = ("Journal field → exact value, or a list of values any of which will do; "
                   "every field named must match")
    _values = ListOf(Text(scalars=True, nonempty=False), min_items=1, single_ok=True)

    def check(self, value: Any, path: PathT, problems: Problems) -> Any:
        if not isinstance(value, Mapping):
            return self.wrong_type(value, path, problems)
        out: dict[str, Any] = {}
        ok = True
        for k, v in value.items():
            try:
                journal_entries.check_field_name(str(k))
            except ValueError as e:
                problems.add((*path, k), f"{show_path((*path, k))}: {e}", at_key=True)
                ok = False
                continue
            out[k] = self._values.check(v, (*path, k), problems)
            ok = ok and out[k] is not INVALID
        return out if ok else INVALID

    def schema(self) -> dict[str, Any]:
        return self._with_description({
            "type": "object",
            "propertyNames": {"pattern": f"^(?!__)(?:{journal_entries.FIELD_NAME_RE})$"},
            "additionalProperties": self._values.schema(),
        })


def _check_unit(text: str) -> str:
    if not text.strip() or any(c.isspace() for c in text) or "=" in text:
        raise ValueError(f"{text!r} is not a unit name; write it like nginx.service, "
                         "nginx (meaning nginx.service) or a glob like 'app-*.service'")
    return journal_entries.unit_name(text)


def _check_folder(text: str) -> str:
    if "\x00" in text or not text.strip():
        raise ValueError("expected the path of a folder of journal files")
    return text


JOURNAL_TRIGGER = Object("a journal trigger", {
    "unit": Field(ListOf(Custom(_check_unit, expects="a unit name"), min_items=1,
                         single_ok=True,
                         description="The systemd unit(s) whose lines fire (_SYSTEMD_UNIT); "
                                     "globs allowed; `nginx` means nginx.service"),
                  default=[]),
    "priority": Field(Priority(), default=None),
    "match": Field(Custom(_check_regex, expects="a regular expression",
                          description="A Python regular expression searched for in MESSAGE; "
                                      "named groups (?P<name>…) become event fields"),
                   default=None),
    "fields": Field(JournalFields(), default={}),
    "from": Field(Enum("end", "start", description="Without a kept cursor: start at the end "
                                                   "(new entries only) or the oldest entry",
                       synonyms={"beginning": "start", "begin": "start", "head": "start",
                                 "oldest": "start", "tail": "end", "now": "end"}),
                  default="end"),
    "directory": Field(Custom(_check_folder, expects="a folder",
                              description="Read the journal files in this folder "
                                          "(journalctl --directory) instead of the system "
                                          "journal"),
                       default=None),
}, description="Fire on each new journald entry that matches (through journalctl -f).",
    synonyms={"units": "unit", "_SYSTEMD_UNIT": "unit", "regex": "match", "message": "match",
              "MESSAGE": "match", "level": "priority", "PRIORITY": "priority",
              "where": "fields", "dir": "directory", "path": "directory"})

EVENT_TRIGGER = Object("an event trigger", {
    "where": Field(Criteria(), default={}),
}, description="Fire on JSON events (opsrun emit, dispatch, watch --stdin).")

WEBHOOK_SHAPES = ("json", "alertmanager")
WEBHOOK_PATH_RE = r"/[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*"
# What the listener itself serves; a trigger cannot take it.
RESERVED_WEBHOOK_PATHS = ("/metrics",)


def _check_webhook_path(text: str) -> str:
    if not re.fullmatch(WEBHOOK_PATH_RE, text) or "/./" in f"{text}/" or "/../" in f"{text}/":
        raise ValueError(f"{text!r} is not a webhook path; write one like /hooks/alertmanager "
                         "(starting with /, letters, digits, . _ ~ - between the slashes, no "
                         "query, no trailing slash)")
    if text in RESERVED_WEBHOOK_PATHS:
        raise ValueError(f"{text} is served by the listener itself (Prometheus metrics); "
                         "choose another path, like /hooks/NAME")
    return text


def _check_secret_name(text: str) -> str:
    from opsrun.webhook import secret_name

    return secret_name(text)


def _webhook_rules(t: dict[str, Any], path: PathT, problems: Problems) -> None:
    given = [k for k in ("token", "hmac") if t[k] is not None]
    if len(given) == 1:
        return
    if given:
        problems.add((*path, given[1]), f"{show_path(path)}: give `token:` or `hmac:`, not "
                     "both; a webhook is checked one way", at_key=True)
    else:
        problems.add(path, f"{show_path(path)}: a webhook needs a secret: `token: NAME` "
                     "(the sender sends `Authorization: Bearer <secret>`) or `hmac: NAME` "
                     "(GitHub's X-Hub-Signature-256), NAME being a secret of the service "
                     "(OPSRUN_SECRET_NAME or --secrets-file)")


SECRET_NAME = Custom(_check_secret_name, expects="the name of a secret",
                     description="The name of a secret (OPSRUN_SECRET_<NAME> or the "
                                 "--secrets-file), or ${{ secrets.NAME }}; never the secret "
                                 "itself")

WEBHOOK_TRIGGER = Object("a webhook trigger", {
    "path": Field(Custom(_check_webhook_path, expects="a URL path",
                         description="Where the sender posts, like /hooks/alertmanager"),
                  required=True),
    "token": Field(SECRET_NAME),
    "hmac": Field(SECRET_NAME),
    "shape": Field(Enum(*WEBHOOK_SHAPES, description="json: the body is one event; "
                                                     "alertmanager: one event per alert"),
                   default="json"),
    "where": Field(Criteria(), default={}),
}, rules=_webhook_rules,
    description="Fire on HTTP POSTs to the service's webhook listener (opsrun watch "
                "--webhook-listen).",
    synonyms={"secret": "token", "bearer": "token", "signature": "hmac", "url": "path",
              "route": "path", "format": "shape"},
    json_extra={"oneOf": [{"required": ["token"]}, {"required": ["hmac"]}]})

TRIGGER_KINDS: dict[str, Object] = {
    "file": FILE_TRIGGER, "schedule": SCHEDULE_TRIGGER, "log": LOG_TRIGGER,
    "event": EVENT_TRIGGER, "journal": JOURNAL_TRIGGER, "webhook": WEBHOOK_TRIGGER,
}


_TRIGGER_HINTS = {
    "cron": " (a cron schedule is written `schedule: {cron: \"…\"}`)",
    "path": " (a file trigger is written `file: {paths: […]}`)",
    "paths": " (a file trigger is written `file: {paths: […]}`)",
    "json": " (JSON events are matched with `event: {where: {…}}`)",
    "where": " (JSON events are matched with `event: {where: {…}}`)",
    "journald": " (journald entries are matched with `journal: {unit: …}`)",
    "systemd": " (journald entries are matched with `journal: {unit: …}`)",
    "workflow_dispatch": " (a runbook without triggers runs by hand: leave `on:` out)",
    "manual": " (a runbook without triggers runs by hand: leave `on:` out)",
    "http": " (HTTP requests are taken with `webhook: {path: …, token: …}`)",
    "alertmanager": " (Alertmanager is taken with `webhook: {path: …, token: …, "
                    "shape: alertmanager}`)",
}


class Trigger(Check):
    """One trigger: a mapping with exactly one key naming its kind."""

    expects = "a trigger like {log: {…}}"

    def check(self, value: Any, path: PathT, problems: Problems) -> Any:
        if not isinstance(value, Mapping):
            return self.wrong_type(value, path, problems)
        if len(value) != 1:
            problems.add(path, f"{show_path(path)}: a trigger has exactly one kind "
                               f"({', '.join(TRIGGER_KINDS)}); found {len(value)} keys — "
                               "start each trigger with its own `-`")
            return INVALID
        (kind, spec), = value.items()
        if kind not in TRIGGER_KINDS:
            hint = _TRIGGER_HINTS.get(kind, did_you_mean(kind, TRIGGER_KINDS))
            problems.add((*path, kind), f"{show_path(path)}: unknown trigger {kind!r}"
                         f"{hint}; triggers are {', '.join(TRIGGER_KINDS)}", at_key=True)
            return INVALID
        if spec is None and kind == "event":
            spec = {}
        cleaned = TRIGGER_KINDS[kind].check(spec, (*path, kind), problems)
        return INVALID if cleaned is INVALID else {kind: cleaned}

    def schema(self) -> dict[str, Any]:
        return {"type": "object", "minProperties": 1, "maxProperties": 1,
                "properties": {k: v.schema() for k, v in TRIGGER_KINDS.items()},
                "additionalProperties": False}


def _one_trigger_per_path(items: list[Any], path: PathT, problems: Problems) -> None:
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if item is INVALID or "webhook" not in item:
            continue
        where = item["webhook"]["path"]
        if where in seen:
            problems.add((*path, i, "webhook", "path"), f"{show_path((*path, i))}: the webhook "
                         f"path {where} is already the path of on[{seen[where]}]; a "
                         "runbook takes each path once (put the conditions of both in one "
                         "trigger's `where:` with `any: [...]`)")
        else:
            seen[where] = i


class Triggers(Check):
    """`on:` — a list of triggers, or a mapping of kind → trigger (one of each kind)."""

    expects = ("a list of triggers (file, schedule, log, event, journal, webhook), like "
               "`- schedule: {cron: …}`")
    description = "What starts this runbook; none means it only runs by hand"

    def check(self, value: Any, path: PathT, problems: Problems) -> Any:
        if value is None:
            return []
        if isinstance(value, Mapping):
            value = [{k: v} for k, v in value.items()]
            items = [Trigger().check(v, path, problems) for v in value]
        elif isinstance(value, list):
            items = [Trigger().check(v, (*path, i), problems) for i, v in enumerate(value)]
            _one_trigger_per_path(items, path, problems)
        else:
            return self.wrong_type(value, path, problems)
        return INVALID if any(v is INVALID for v in items) else items

    def schema(self) -> dict[str, Any]:
        one = Trigger().schema()
        return self._with_description({"anyOf": [
            {"type": "array", "items": one},
            {"type": "object", "properties": one["properties"], "additionalProperties": False},
            {"type": "null"},
        ]})


# ── params ──────────────────────────────────────────────────────────────────

PARAM_TYPES = ("string", "int", "float", "bool", "choice")


def _param_rules(p: dict[str, Any], path: PathT, problems: Problems) -> None:
    kind = p["type"]
    where = show_path(path)
    if kind == "choice" and not p["choices"]:
        problems.add(path, f"{where}: a choice param needs `choices: [a, b, …]`")
        return
    if kind != "choice" and p["choices"]:
        problems.add((*path, "choices"), f"{where}: `choices` is only for type: choice",
                     at_key=True)
    if p["pattern"] is not None and kind != "string":
        problems.add((*path, "pattern"), f"{where}: `pattern` is only for type: string",
                     at_key=True)
    if p["required"] and p["default"] is not None:
        problems.add((*path, "required"), f"{where}: a param with a default is never "
                     "missing; drop `required: true` or the default", at_key=True)
    if p["default"] is not None:
        from opsrun.params import ParamError, coerce_value

        try:
            coerce_value(p, p["default"])
        except ParamError as e:
            problems.add((*path, "default"), f"{where}.default: {e}")


PARAM = Object("a param", {
    "type": Field(Enum(*PARAM_TYPES, description="string, int, float, bool or choice"),
                  default="string"),
    "description": Field(Text(), default=""),
    "default": Field(Anything(description="Value when none is given")),
    "required": Field(Boolean(description="Must be given with -p"), default=False),
    "pattern": Field(PARAM_PATTERN),
    "choices": Field(ListOf(Text(scalars=True), min_items=1), default=[]),
}, rules=_param_rules, description="A typed parameter, given with -p name=value")

PARAMS = MapOf(PARAM, key_pattern=IDENT_RE,
               key_hint="param names are letters, digits and _, starting with a letter",
               description="Typed parameters")


# ── steps ───────────────────────────────────────────────────────────────────

CONFIRM_ONLY = ("approvers", "on_timeout")
RUN_ONLY = ("shell", "workdir", "retry", "host", "hosts", "parallel")

APPROVERS = Alternatives(
    (lambda v: isinstance(v, list), ListOf(Text(), min_items=1)),
    (lambda v: isinstance(v, Mapping), Object("approvers", {
        "users": Field(ListOf(Text(), single_ok=True,
                              description="User names (or group:NAME)"), default=[]),
        "groups": Field(ListOf(Text(), single_ok=True, description="Group names"),
                        default=[]),
        "not_starter": Field(Boolean(description="The user who started the run may not "
                                                 "answer"), default=False),
    })),
    (lambda v: isinstance(v, str), Text()),
    expects="a list of users and group:NAME entries, or {users, groups, not_starter}",
    description="Who may answer; default: anyone who can reach the state folder",
)

RETRY_ON = ("failure", "timed_out")

RETRY = Alternatives(
    (lambda v: isinstance(v, int) and not isinstance(v, bool),
     Integer(minimum=1, maximum=100)),
    (lambda v: isinstance(v, Mapping), Object("retry", {
        "attempts": Field(Integer(minimum=1, maximum=100,
                                  description="Tries in all, the first included"), default=3),
        "delay": Field(Duration(description="Wait before the second try"), default=1.0),
        "backoff": Field(Number(minimum=1.0, description="Multiply the delay by this "
                                                         "after each try"), default=1.0),
        "max_delay": Field(Duration(description="The longest wait between two tries")),
        "jitter": Field(Enum("none", "full", description="full: wait a random time up to "
                             "the delay, so that many runs do not retry at once"),
                        default="none"),
        "on": Field(ListOf(Enum(*RETRY_ON, description="failure or timed_out"),
                           min_items=1, single_ok=True,
                           description="Which outcomes are tried again"),
                    default=list(RETRY_ON)),
        "on_exit_codes": Field(ListOf(Integer(minimum=0, maximum=255), min_items=1,
                                      single_ok=True,
                                      description="Try a failure again only after these "
                                                  "exit codes"), default=[]),
    })),
    expects="a number of attempts or {attempts, delay, backoff, max_delay, jitter, on, "
            "on_exit_codes}",
    description="Try again when the step fails",
)


STEP_KINDS = ("run", "confirm", "emit", "uses", "parallel")
# Keys that belong to one kind of step only (`parallel` is checked on its own: an int
# bounds an SSH step's hosts at once, a mapping holds branches).
KIND_ONLY = {
    "confirm": ("approvers", "on_timeout"),
    "run": ("shell", "workdir", "host", "hosts"),
    "uses": ("with",),
}
RETRIED_KINDS = ("run", "uses")
LOOPED_KINDS = ("run", "emit", "uses")


def step_kind(s: Mapping[str, Any]) -> str | None:
    """The kind of a (checked) step: what it does, or None when it says nothing to do."""
    if isinstance(s.get("parallel"), Mapping):
        return "parallel"
    for kind in ("run", "confirm", "emit", "uses"):
        if s.get(kind) is not None:
            return kind
    return None


def _step_rules(s: dict[str, Any], path: PathT, problems: Problems) -> None:
    where = show_path(path)
    kinds = [k for k in ("run", "confirm", "emit", "uses") if s[k] is not None]
    if isinstance(s["parallel"], Mapping):
        kinds.append("parallel")
    if not kinds:
        problems.add(path, f"{where}: a step needs `run:` (a command), `confirm:` (a question "
                           "for a person), `emit:` (an event), `uses:` (another runbook) or "
                           "`parallel:` (branches of steps)")
        return
    if len(kinds) > 1:
        problems.add((*path, kinds[1]), f"{where}: a step has one of `{kinds[0]}:` and "
                     f"`{kinds[1]}:`, not both; split it into two steps", at_key=True)
        return
    kind = kinds[0]
    for other, keys in KIND_ONLY.items():
        if other == kind:
            continue
        for key in keys:
            if s[key] not in (None, [], False, {}):
                problems.add((*path, key), f"{where}: `{key}` only applies to a "
                             f"`{other}:` step", at_key=True)
    if s["retry"] is not None and kind not in RETRIED_KINDS:
        problems.add((*path, "retry"), f"{where}: `retry` only applies to a `run:` or "
                     "`uses:` step", at_key=True)
    if s["timeout"] is not None and kind in ("emit", "uses", "parallel"):
        problems.add((*path, "timeout"), f"{where}: `timeout` applies to `run:` and "
                     f"`confirm:` steps, not to a `{kind}:` step; give it to the steps "
                     "inside, or bound the whole run with the runbook's `timeout:`",
                     at_key=True)
    if s["env"] and kind == "parallel":
        problems.add((*path, "env"), f"{where}: `env` applies to the steps that run "
                     "commands; give it to the steps in the branches, or to the runbook",
                     at_key=True)
    if s["host"] is not None and s["hosts"]:
        problems.add((*path, "host"), f"{where}: use `host:` or `hosts:`, not both",
                     at_key=True)
    if isinstance(s["parallel"], int) and not s["hosts"]:
        problems.add((*path, "parallel"), f"{where}: `parallel: N` needs `hosts:` (it bounds "
                     "how many hosts run at once); add the hosts, remove `parallel`, or give "
                     "it branches of steps (`parallel: {name: [steps]}`)", at_key=True)
    if s["for_each"] is not None and kind not in LOOPED_KINDS:
        problems.add((*path, "for_each"), f"{where}: `for_each` only applies to a `run:`, "
                     "`emit:` or `uses:` step", at_key=True)
    if s["max_parallel"] is not None and s["for_each"] is None:
        problems.add((*path, "max_parallel"), f"{where}: `max_parallel` needs `for_each:` "
                     "(it bounds how many items run at once)", at_key=True)
    if s["fail_fast"] is not None and kind != "parallel" and s["for_each"] is None:
        problems.add((*path, "fail_fast"), f"{where}: `fail_fast` only applies to a "
                     "`parallel:` step or a step with `for_each:`", at_key=True)


def _check_one_expression(text: str) -> str:
    _check_template(text)
    parts = expressions.split(text.strip())
    if len(parts) != 1 or not isinstance(parts[0], expressions.Expr):
        raise PositionedError("give the list as one `${{ … }}` expression, like "
                              "`${{ event.alerts }}`, or write the list in YAML")
    return text


FOR_EACH = Alternatives(
    (lambda v: isinstance(v, list), ListOf(Anything(), description="The items")),
    (lambda v: isinstance(v, str), Custom(_check_one_expression, expects="an expression")),
    expects="a list, or one `${{ … }}` expression that gives a list",
    description="Run the step once per item of a list; `item` (and `item_index`) read it")


BRANCHES = MapOf(Lazy(lambda: _steps(), "steps"), key_pattern=IDENT_RE,
                 key_hint="a branch name is letters, digits and _, starting with a letter",
                 description="Branches: name → steps; the branches run at once and the "
                             "step ends when all have ended")

EMIT = MapOf(Anything(), key_pattern=r".+", key_hint="",
             description="An event to queue for other runbooks: a JSON object; ${{ … }} in "
                         "its texts is rendered (a text that is one expression keeps the "
                         "value's type)")

WITH = MapOf(Anything(), key_pattern=IDENT_RE,
             key_hint="inputs are the used runbook's param names",
             description="Inputs of the used runbook, by param name; ${{ … }} is rendered")


STEP = Object("a step", {
    "id": Field(Text(pattern=IDENT_RE, hint="an id is letters, digits and _, starting with a "
                     "letter (steps.<id> must read as a name in expressions)",
                     description="Name to refer to this step's results: steps.<id>")),
    "name": Field(Text(description="Shown while the step runs")),
    "run": Field(Text(description="Shell commands (bash -c); ${{ … }} values are inserted "
                                  "as single words, never as shell syntax")),
    "confirm": Field(Text(description="A question a person must answer yes to")),
    "emit": Field(EMIT),
    "uses": Field(Text(description="Run another runbook here: its name, or a file path "
                                   "beside this one (./restart.yaml)")),
    "with": Field(WITH, default={}),
    "for_each": Field(FOR_EACH),
    "max_parallel": Field(Integer(minimum=1, maximum=1000,
                                  description="for_each: items at once (default 1)")),
    "fail_fast": Field(Boolean(description="parallel/for_each: the first failure stops the "
                                           "others (default true); false lets them finish")),
    "if": Field(Alternatives((lambda v: isinstance(v, bool), Boolean()),
                             (lambda v: isinstance(v, str), EXPRESSION),
                             expects="an expression or true/false",
                             description="Run the step only when this is true")),
    "env": Field(ENV, default={}),
    "timeout": Field(Duration(description="Stop the step after this long", minimum_s=0.001,
                              too_short="leave `timeout:` out for no limit")),
    "retry": Field(RETRY),
    "continue_on_error": Field(Boolean(description="A failure does not fail the run"),
                               default=False),
    "host": Field(Text(description="Run over SSH on this inventory host")),
    "hosts": Field(ListOf(Text(), min_items=1, single_ok=True,
                          description="Run over SSH on these hosts (group:NAME expands)",
                          too_few="is empty; name hosts or groups of the inventory, like "
                                  "[web-1, \"group:db\"], or leave `hosts:` out to run here"),
                   default=[]),
    "parallel": Field(Alternatives(
        (lambda v: isinstance(v, Mapping), BRANCHES),
        (lambda v: not isinstance(v, Mapping), Integer(minimum=1, maximum=1000,
                                                       description="Hosts at once")),
        expects="a number of hosts at once, or branches (name: [steps])",
        description="With hosts: how many at once (default 1); a mapping: branches of "
                    "steps that run at the same time")),
    "workdir": Field(TEMPLATE),
    "shell": Field(Text(description="Shell to run the commands with (default bash)")),
    "approvers": Field(APPROVERS),
    "on_timeout": Field(Enum("deny", "approve", description="Answer given when nobody "
                                                            "answers in time (default deny)")),
}, rules=_step_rules, description="One step: run: commands or confirm: a question",
    # What GitHub Actions, Ansible and other tools call these keys.
    synonyms={"command": "run", "cmd": "run", "script": "run", "shell_command": "run",
              "prompt": "confirm", "ask": "confirm", "when": "if", "condition": "if",
              "continue-on-error": "continue_on_error", "ignore_errors": "continue_on_error",
              "timeout-minutes": "timeout", "timeout_minutes": "timeout", "retries": "retry",
              "working-directory": "workdir", "cwd": "workdir", "chdir": "workdir",
              "environment": "env", "approver": "approvers", "hostname": "host"},
    refused={k: f"`{k}` is refused: a runbook never holds a password; SSH steps log in "
                "with keys (the inventory's `key:`, the SSH agent or your usual keys), and "
                "a secret a command needs comes from `secrets.NAME`"
             for k in PASSWORD_KEYS},
    json_extra={"oneOf": [{"required": ["run"]}, {"required": ["confirm"]},
                          {"required": ["emit"]}, {"required": ["uses"]},
                          {"required": ["parallel"], "properties": {
                              "parallel": {"type": "object"}}}]})

def _steps() -> Check:
    return STEPS


STEPS = ListOf(STEP, min_items=1, description="The steps, run in order",
               expects="a list of steps, each starting with `- `, like `- run: uptime`",
               too_few="is empty; a runbook needs at least one step, like `- run: uptime`")

CONCURRENCY = Object("concurrency", {
    "key": Field(TEMPLATE, default=""),
    "policy": Field(Enum("queue", "skip", "replace", "parallel",
                         description="What to do when a run with the same key is running"),
                    default="queue"),
}, description="How runs of this runbook overlap (default: queue, one at a time)")

THROTTLE_MODES = ("once_within", "once_after")


def _throttle_rules(t: dict[str, Any], path: PathT, problems: Problems) -> None:
    given = [m for m in THROTTLE_MODES if t[m] is not None]
    if len(given) == 1:
        return
    if given:
        problems.add((*path, given[1]), f"{show_path(path)}: give `once_within:` or "
                     "`once_after:`, not both: once_within runs the first event of a window, "
                     "once_after the last one when the window ends", at_key=True)
    else:
        problems.add(path, f"{show_path(path)}: needs `once_within: DURATION` (run the first "
                     "event, drop the rest of the window) or `once_after: DURATION` (run the "
                     "last event once the window ends)")


def _window(what: str) -> Field:
    return Field(Duration(description=what, minimum_s=0.001,
                          too_short="a throttle window needs a length, like 10m"))


THROTTLE = Object("throttle", {
    "once_within": _window("Run the first event of each window this long; the events "
                           "after it in the window start no run (run.throttled)"),
    "once_after": _window("Collect events for this long from the first one, then run once "
                          "with the last (each is recorded as run.throttled)"),
    "key": Field(TEMPLATE, default=""),
}, rules=_throttle_rules,
    description="At most one run per window and key, for alert storms (kept in the state "
                "folder across restarts)",
    synonyms={"within": "once_within", "after": "once_after", "window": "once_within",
              "period": "once_within", "interval": "once_within"},
    json_extra={"oneOf": [{"required": ["once_within"]}, {"required": ["once_after"]}]})

RUNBOOK = Object("the runbook", {
    "name": Field(Text(pattern=NAME_RE, hint="a name is letters, digits, -, _ and ., "
                       "starting with a letter or digit",
                       description="Unique name; defaults to the file name")),
    "description": Field(Text(), default=""),
    "on": Field(Triggers(), default=[]),
    "params": Field(PARAMS, default={}),
    "env": Field(ENV, default={}),
    "concurrency": Field(CONCURRENCY),
    "throttle": Field(THROTTLE),
    "timeout": Field(Duration(description="Stop the whole run after this long",
                              minimum_s=0.001, too_short="leave `timeout:` out for no limit")),
    "steps": Field(STEPS, required=True),
    "on_failure": Field(ListOf(STEP, description="Steps run when the run fails"), default=[]),
    "on_denied": Field(ListOf(STEP, description="Steps run when a confirmation is denied "
                                                "or times out"), default=[]),
    "on_success": Field(ListOf(STEP, description="Steps run when every step succeeded"),
                        default=[]),
    "outputs": Field(MapOf(TEMPLATE, key_pattern=IDENT_RE,
                           key_hint="output names are letters, digits and _, starting with "
                                    "a letter",
                           description="What a caller's `uses:` step gets as "
                                       "steps.<id>.outputs: name → text"), default={}),
    "notify": Field(NOTIFY_TARGETS, default=[]),
}, description="An opsrun runbook")


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the runbook format, for editors and other tools."""
    s = RUNBOOK.schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            "title": "opsrun runbook", **s, "$defs": {"steps": STEPS.schema()}}
