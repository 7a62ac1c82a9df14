"""Notification targets: the `notify:` format (runbook and service file), checked and built.

A target is a webhook (a JSON POST, generic or Slack-shaped) or a command (argv, or a
shell line run with `sh -c`) and the events it wants: `waiting`, `failed`, `timed_out`,
`stale`. A webhook's URL and headers may read `${{ secrets.NAME }}` and nothing else: they
are kept as written (the template) in the outbox and the audit log, and rendered only at
the moment of delivery, so no secret is ever stored or logged.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from opsrun import expressions
from opsrun.errors import Problem
from opsrun.schema_checks import (
    INVALID,
    Alternatives,
    Custom,
    Duration,
    Enum,
    Field,
    Integer,
    ListOf,
    MapOf,
    Object,
    PathT,
    Problems,
    Text,
    show_path,
)

EVENTS = ("waiting", "failed", "timed_out", "stale")
FORMATS = ("json", "slack")
NOTIFY_NAMES = ("notify.yaml", "notify.yml")  # the service-level file beside the runbooks
DEFAULT_STALE_S = 30 * 60.0
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_ATTEMPTS = 10
DEFAULT_DELAY_S = 1.0
MAX_DELAY_S = 600.0  # backoff doubles from `delay` up to this


class Target(NamedTuple):
    """Where one kind of notification goes, and how hard to try."""

    kind: str  # webhook | command
    url: str | None = None  # the template, as written
    format: str = "json"
    headers: Mapping[str, str] = {}
    argv: tuple[str, ...] = ()  # a shell line is ("sh", "-c", LINE)
    events: tuple[str, ...] = EVENTS
    stale_after_s: float = DEFAULT_STALE_S
    timeout_s: float = DEFAULT_TIMEOUT_S
    attempts: int = DEFAULT_ATTEMPTS
    delay_s: float = DEFAULT_DELAY_S
    name: str = ""
    origin: str = "runbook"  # runbook | service

    def describe(self) -> str:
        """How the target is named in logs and the audit log: never its path or query."""
        if self.name:
            return self.name
        if self.kind == "webhook":
            host = _host_of(self.url or "")
            return f"webhook to {host}" + (" (slack)" if self.format == "slack" else "")
        return f"command {self.argv[0] if self.argv[:2] != ('sh', '-c') else self.argv[2]}"

    def as_record(self) -> dict[str, Any]:
        """The target as JSON, secrets unrendered: what the outbox keeps."""
        return {"kind": self.kind, "url": self.url, "format": self.format,
                "headers": dict(self.headers), "argv": list(self.argv),
                "events": list(self.events), "stale_after_s": self.stale_after_s,
                "timeout_s": self.timeout_s, "attempts": self.attempts,
                "delay_s": self.delay_s, "name": self.name, "origin": self.origin}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Target:
        return cls(rec["kind"], rec.get("url"), rec.get("format", "json"),
                   dict(rec.get("headers") or {}), tuple(rec.get("argv") or ()),
                   tuple(rec.get("events") or EVENTS),
                   float(rec.get("stale_after_s", DEFAULT_STALE_S)),
                   float(rec.get("timeout_s", DEFAULT_TIMEOUT_S)),
                   int(rec.get("attempts", DEFAULT_ATTEMPTS)),
                   float(rec.get("delay_s", DEFAULT_DELAY_S)), rec.get("name") or "",
                   rec.get("origin") or "runbook")


def _host_of(url: str) -> str:
    if "${{" in url.split("//", 1)[-1].split("/", 1)[0]:
        return "(a host from a secret)"
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"


# ── the format ──────────────────────────────────────────────────────────────

def _check_secret_template(text: str) -> str:
    """A text whose `${{ … }}` read secrets only: the message data never reaches a URL."""
    try:
        parts = expressions.split(text)
    except expressions.ExpressionSyntaxError as e:
        raise ValueError(e.message) from None
    for part in parts:
        if not isinstance(part, expressions.Expr):
            continue
        try:
            refs = expressions.check(part.source)
        except expressions.ExpressionSyntaxError as e:
            raise ValueError(e.message) from None
        wrong = sorted({r.root for r in refs if r.root != "secrets"})
        if wrong or not refs or any(r.key is None for r in refs):
            raise ValueError(f"`${{{{ {part.source} }}}}`: a notification target reads only "
                             "secrets, like ${{ secrets.SLACK_WEBHOOK }}; what a message "
                             "says (run, step, question) is in its body")
    return text


def _check_url(text: str) -> str:
    _check_secret_template(text)
    if not re.match(r"(?i)https?://", text):
        raise ValueError(f"{text!r} is not an http:// or https:// URL")
    return text


URL = Custom(_check_url, expects="an http:// or https:// URL",
             description="The URL to POST to; ${{ secrets.NAME }} may give a part of it")
HEADER = Custom(_check_secret_template, expects="a text",
                description="A header value; ${{ secrets.NAME }} may give it")


def _check_command_line(text: str) -> str:
    if "${{" in text:
        raise ValueError("a command target takes no ${{ … }}: it reads the message on stdin "
                         "and its fields in OPSRUN_NOTIFY_* variables, and secrets from its "
                         "environment (OPSRUN_SECRET_NAME)")
    if not text.strip():
        raise ValueError("must not be empty")
    return text


COMMAND_WORD = Custom(_check_command_line, expects="a text")
COMMAND = Alternatives(
    (lambda v: isinstance(v, list), ListOf(COMMAND_WORD, min_items=1,
                                           too_few="is empty; give the program and its "
                                                   "arguments, like [logger, -t, opsrun]")),
    (lambda v: isinstance(v, str), COMMAND_WORD),
    expects="a list of words (argv) or a shell line",
    description="A command that gets the message on stdin: [program, args…], or a shell "
                "line run with sh -c")


def _target_rules(t: dict[str, Any], path: PathT, problems: Problems) -> None:
    where = show_path(path)
    given = [k for k in ("webhook", "command") if t[k] is not None]
    if not given:
        problems.add(path, f"{where}: a notification target needs `webhook: URL` (a JSON "
                           "POST) or `command: [program, args…]` (the message on stdin)")
        return
    if len(given) == 2:
        problems.add((*path, "command"), f"{where}: give `webhook:` or `command:`, not both; "
                     "make two targets", at_key=True)
        return
    if given[0] == "command":
        for key in ("format", "headers"):
            if t[key] not in (None, {}):
                problems.add((*path, key), f"{where}: `{key}` only applies to a `webhook:` "
                             "target", at_key=True)


TARGET = Object("a notification target", {
    "name": Field(Text(description="How the target is named in the log and the audit log")),
    "webhook": Field(URL),
    "format": Field(Enum(*FORMATS, description="json (default): opsrun's JSON message; "
                                               "slack: a Slack-compatible {text, blocks} "
                                               "body")),
    "headers": Field(MapOf(HEADER, key_pattern=r"[A-Za-z0-9-]+",
                           key_hint="header names are letters, digits and -",
                           description="Extra HTTP headers")),
    "command": Field(COMMAND),
    "on": Field(ListOf(Enum(*EVENTS, description="waiting, failed, timed_out or stale"),
                       min_items=1, single_ok=True,
                       description="Which events are sent (default: all)"),
                default=list(EVENTS)),
    "stale_after": Field(Duration(description="A wait this old is notified as stale, once "
                                              "(default 30m)", minimum_s=0.001)),
    "timeout": Field(Duration(description="Give one attempt this long (default 10s)",
                              minimum_s=0.001)),
    "attempts": Field(Integer(minimum=1, maximum=100,
                              description="Tries in all before giving up (default 10)")),
    "retry_delay": Field(Duration(description="Wait before the second try; doubled after "
                                              "each try, up to 10m (default 1s)")),
}, rules=_target_rules, description="Where to send a notification: webhook: or command:",
    synonyms={"url": "webhook", "slack": "webhook", "run": "command", "cmd": "command",
              "events": "on", "when": "on", "retries": "attempts"},
    json_extra={"oneOf": [{"required": ["webhook"]}, {"required": ["command"]}]})

TARGETS = ListOf(TARGET, description="Tell people when a run waits for them, fails, times "
                                     "out, or a wait goes stale",
                 expects="a list of targets, like `- webhook: https://…`")

SERVICE_FILE = Object("the notify file", {
    "notify": Field(TARGETS, required=True),
}, description="Notification targets of every runbook of `opsrun watch`")


def build(raw: list[dict[str, Any]] | None, origin: str = "runbook") -> tuple[Target, ...]:
    """Targets from their checked YAML."""
    out = []
    for t in raw or []:
        command = t["command"]
        argv: tuple[str, ...] = ()
        if isinstance(command, list):
            argv = tuple(command)
        elif isinstance(command, str):
            argv = ("sh", "-c", command)
        out.append(Target(
            "webhook" if t["webhook"] is not None else "command", t["webhook"],
            t["format"] or "json", dict(t["headers"] or {}), argv,
            tuple(dict.fromkeys(t["on"])),
            DEFAULT_STALE_S if t["stale_after"] is None else t["stale_after"],
            DEFAULT_TIMEOUT_S if t["timeout"] is None else t["timeout"],
            DEFAULT_ATTEMPTS if t["attempts"] is None else t["attempts"],
            DEFAULT_DELAY_S if t["retry_delay"] is None else t["retry_delay"],
            t["name"] or "", origin))
    return tuple(out)


# ── the service-level file ─────────────────────────────────────────────────

class NotifyFileInvalid(Exception):
    """The notify file has problems; each names its file:line:col."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def find_service_file(runbooks_dir: Path) -> Path | None:
    """The notify.yaml (or .yml) beside the runbooks, if there is one."""
    for name in NOTIFY_NAMES:
        if (runbooks_dir / name).is_file():
            return runbooks_dir / name
    return None


def load_service_file(path: Path) -> tuple[Target, ...]:
    """Read and check a notify file; raise NotifyFileInvalid with every problem."""
    from opsrun.yaml_load import YamlError, load_bytes, read_limited

    try:
        doc = load_bytes(read_limited(path))
    except YamlError as e:
        raise NotifyFileInvalid([Problem(str(path), e.line, e.col, e.message)]) from None
    except OSError as e:
        raise NotifyFileInvalid([Problem(str(path), 1, 1, "cannot read the notify file: "
                                         f"{e.strerror}")]) from None
    problems = Problems()
    if not isinstance(doc.data, Mapping):
        problems.add((), "the notify file is a mapping with `notify:`, a list of targets, "
                         "like `notify: [{webhook: https://…}]`")
        data = INVALID
    else:
        data = SERVICE_FILE.check(doc.data, (), problems)
    if problems or data is INVALID:
        raise NotifyFileInvalid(problems.located(doc, path))
    return build(data["notify"], origin="service")
