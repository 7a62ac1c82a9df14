"""Runbooks: YAML files → validated, immutable Runbook objects, or every problem found.

`load_runbook(path)` and `load_runbooks(folder)` are the only ways in. Structure and types
are checked by `runbook_schema.RUNBOOK`; what needs the whole runbook (step ids, the names that
expressions read, shell quoting contexts) is checked here.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple, Union

from opsrun import expressions, journal_entries, shell_words
from opsrun import runbook_schema as schema
from opsrun.criteria import Criteria, parse_where
from opsrun.digest import sha256_hex
from opsrun.errors import Problem, RunbookInvalid, UsageError
from opsrun.inventory import (
    INVENTORY_NAMES,
    Host,
    Inventories,
    Inventory,
    InventoryInvalid,
)
from opsrun.notify.targets import NOTIFY_NAMES, NotifyFileInvalid
from opsrun.notify.targets import find_service_file as find_notify_file
from opsrun.notify.targets import load_service_file as load_notify_file
from opsrun.notify.targets import Target as NotifyTarget
from opsrun.notify.targets import build as build_notify_targets
from opsrun.params import Param
from opsrun.paths import DEFAULT_RUNBOOKS
from opsrun.schema_checks import INVALID, PathT, Problems, show_path
from opsrun.yaml_load import YamlError, load_bytes, read_limited

COMMON_EVENT_FIELDS = ("source", "id", "time")
STEP_LISTS = ("steps", "on_failure", "on_denied", "on_success")
LOOP_NAMES = ("item", "item_index")  # what a `for_each:` step's expressions read besides
RUN_FIELDS = ("id", "runbook", "sha256", "started_by", "dry_run")
FAILURE_RUN_FIELDS = ("failed_step",)

_EMPTY_MAP: Mapping[str, Any] = MappingProxyType({})


class FileTrigger(NamedTuple):
    paths: tuple[str, ...]
    events: tuple[str, ...]
    debounce_s: float
    ignore: tuple[str, ...]
    kind: str = "file"
    fields: tuple[str, ...] = ("path", "change")


class ScheduleTrigger(NamedTuple):
    cron: str
    timezone: str
    catch_up: str
    jitter_s: float
    kind: str = "schedule"
    fields: tuple[str, ...] = ("scheduled_for", "missed")


class LogTrigger(NamedTuple):
    path: str
    match: str | None
    start_at: str  # "end" | "start"
    kind: str = "log"
    fields: tuple[str, ...] = ("path", "line", "lineno")

    @property
    def pattern(self) -> re.Pattern[str] | None:
        return _compiled(self.match) if self.match is not None else None


class EventTrigger(NamedTuple):
    where: Criteria
    kind: str = "event"
    fields: tuple[str, ...] = ()


class WebhookTrigger(NamedTuple):
    path: str  # the URL path the sender posts to
    scheme: str  # "token" (Authorization: Bearer) | "hmac" (X-Hub-Signature-256)
    secret: str  # the name of the secret, never its value
    shape: str  # "json" | "alertmanager" (opsrun.webhook)
    where: Criteria
    kind: str = "webhook"

    @property
    def fields(self) -> tuple[str, ...]:
        from opsrun.webhook import ALERTMANAGER_FIELDS

        return ALERTMANAGER_FIELDS if self.shape == "alertmanager" else ()

    def auth(self) -> tuple[str, str, str]:
        """What must be the same for triggers that share a path: scheme, secret, shape."""
        return (self.scheme, self.secret, self.shape)



class JournalTrigger(NamedTuple):
    units: tuple[str, ...]  # names or globs of _SYSTEMD_UNIT; none: any
    priority: int | None  # this or more severe (0 emerg … 7 debug)
    match: str | None  # regex on MESSAGE
    field_matches: tuple[tuple[str, tuple[str, ...]], ...]  # field → any of these values
    start_at: str  # "end" | "start": where to begin without a kept cursor
    directory: str | None  # journalctl --directory; None: the system journal
    kind: str = "journal"
    fields: tuple[str, ...] = journal_entries.EVENT_FIELDS

    @property
    def pattern(self) -> re.Pattern[str] | None:
        return _compiled(self.match) if self.match is not None else None

    def check(self, data: Mapping[str, Any]) -> dict[str, Any] | None:
        """The fields a matching journal event adds (the named groups), else None."""
        return journal_entries.matches(self.units, self.priority, dict(self.field_matches),
                                       self.pattern, data)

    def why_not(self, data: Mapping[str, Any]) -> list[str]:
        """Why a journal event does not match; [] when it does."""
        return journal_entries.why_not(self.units, self.priority, dict(self.field_matches),
                                       self.pattern, data)


Trigger = Union[FileTrigger, ScheduleTrigger, LogTrigger, EventTrigger, JournalTrigger,
                WebhookTrigger]


class Retry(NamedTuple):
    attempts: int = 1
    delay_s: float = 1.0
    backoff: float = 1.0
    max_delay_s: float | None = None
    jitter: str = "none"  # none | full
    on: tuple[str, ...] = ("failure", "timed_out")  # step outcomes tried again
    on_exit_codes: tuple[int, ...] = ()  # only these failures, when given

    def retries(self, outcome: str, exit_code: int | None) -> bool:
        """Whether a try that ended so is tried again (attempts left aside)."""
        if outcome not in self.on:
            return False
        return outcome != "failure" or not self.on_exit_codes or exit_code in self.on_exit_codes

    def wait_before(self, attempt: int) -> float:
        """Seconds to wait before try `attempt` (2, 3, …): the delay times backoff**(n-2),
        at most max_delay, and with `jitter: full` a random time up to that."""
        wait = self.delay_s * self.backoff ** max(0, attempt - 2)
        if self.max_delay_s is not None:
            wait = min(wait, self.max_delay_s)
        if self.jitter == "full":
            import random  # only for the runbooks that ask for it

            wait = random.uniform(0.0, wait)
        return wait


class Approvers(NamedTuple):
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    not_starter: bool = False

    def as_record(self) -> dict[str, Any]:
        """Who may answer, as stored with the question and written to the audit log."""
        return {"users": list(self.users), "groups": list(self.groups),
                "not_starter": self.not_starter}

    @property
    def anyone(self) -> bool:
        return not self.users and not self.groups


class Step(NamedTuple):
    id: str
    kind: str  # "run" | "confirm" | "emit" | "uses" | "parallel"
    position: int  # its place in its list (steps, on_failure, on_denied), from 0
    name: str = ""
    run: str | None = None
    confirm: str | None = None
    condition: str | bool | None = None  # `if:`
    env: Mapping[str, str] = _EMPTY_MAP
    timeout_s: float | None = None
    retry: Retry = Retry()
    continue_on_error: bool = False
    hosts: tuple[str, ...] = ()
    parallel: int = 1
    workdir: str | None = None
    shell: str = "bash"
    approvers: Approvers = Approvers()
    on_timeout: str = "deny"
    explicit_id: bool = True
    plan: shell_words.ShellPlan | None = None
    targets: tuple[Host, ...] = ()  # `hosts:` with groups expanded, from the inventory
    emit: Mapping[str, Any] | None = None  # the event an `emit:` step queues (templates)
    uses: str | None = None  # the reference as written
    used: Runbook | None = None  # the runbook it names, loaded and checked
    inputs: Mapping[str, Any] = _EMPTY_MAP  # `with:`
    branches: tuple[tuple[str, tuple[Step, ...]], ...] = ()  # `parallel:` as a mapping
    for_each: str | tuple[Any, ...] | None = None  # an expression, or the items as written
    max_parallel: int = 1
    fail_fast: bool = True

    def nested(self) -> Iterable[Step]:
        """The steps inside this one (branches), depth first; a used runbook's are its own."""
        for _name, steps in self.branches:
            for step in steps:
                yield step
                yield from step.nested()

    @property
    def title(self) -> str:
        """What to call the step on screen."""
        if self.name:
            return self.name
        if self.explicit_id:
            return self.id
        text = self.run if self.run is not None else (self.confirm or "")
        first = text.strip().splitlines()[0] if text.strip() else ""
        return first if len(first) <= 60 else first[:57] + "..."


class Concurrency(NamedTuple):
    key: str = ""
    policy: str = "queue"


class Throttle(NamedTuple):
    """At most one run per window of `window_s` for each rendered `key`.

    `once_within`: the first event of a window runs, the others in it do not;
    `once_after`: no event runs at once, and the last of the window runs when it ends.
    """

    mode: str  # once_within | once_after
    window_s: float
    key: str = ""  # a template reading event and params; "" = one window for the runbook


class Runbook(NamedTuple):
    name: str
    path: Path
    sha256: str
    steps: tuple[Step, ...]
    description: str = ""
    triggers: tuple[Trigger, ...] = ()
    params: Mapping[str, Param] = _EMPTY_MAP
    env: Mapping[str, str] = _EMPTY_MAP
    concurrency: Concurrency = Concurrency()
    throttle: Throttle | None = None
    timeout_s: float | None = None
    on_failure: tuple[Step, ...] = ()
    on_denied: tuple[Step, ...] = ()
    on_success: tuple[Step, ...] = ()
    outputs: Mapping[str, str] = _EMPTY_MAP  # what a caller's `uses:` step gets
    notify: tuple[NotifyTarget, ...] = ()  # who is told when a run waits, fails, …
    source: bytes = b""  # the file's bytes
    # What is right but looks wrong on this machine (an approvers group it lacks).
    warnings: tuple[Problem, ...] = ()

    def all_steps(self) -> Iterable[Step]:
        """Every step, branches included, in the order the lists are written."""
        for step in (*self.steps, *self.on_failure, *self.on_denied, *self.on_success):
            yield step
            yield from step.nested()

    def event_fields(self) -> set[str] | None:
        """Fields its events can carry, or None when any field may come (event triggers, manual)."""
        return _event_fields(self.triggers)


_regex_cache: dict[str, re.Pattern[str]] = {}


def _compiled(pattern: str) -> re.Pattern[str]:
    if pattern not in _regex_cache:
        _regex_cache[pattern] = re.compile(pattern)
    return _regex_cache[pattern]


def _event_fields(triggers: Iterable[Trigger]) -> set[str] | None:
    triggers = list(triggers)
    if not triggers or any(t.kind == "event" or (isinstance(t, WebhookTrigger) and
                                                  t.shape == "json") for t in triggers):
        return None
    known = set(COMMON_EVENT_FIELDS)
    for t in triggers:
        known.update(t.fields)
        if isinstance(t, (LogTrigger, JournalTrigger)) and t.pattern is not None:
            known.update(t.pattern.groupindex)
    return known


# ── loading ─────────────────────────────────────────────────────────────────

def load_runbook(path: Path, *, inventory: Path | None = None) -> Runbook:
    """Load and validate one runbook file; raise RunbookInvalid with every problem.

    Host names are checked against `inventory`, else the inventory found beside the file.
    """
    runbook, problems = _load(path, inventories=Inventories(inventory))
    if problems or runbook is None:
        raise RunbookInvalid(problems)
    return runbook


def runbook_files(folder: Path) -> list[Path]:
    """The runbook files under a folder: *.yaml and *.yml, hidden ones and inventories skipped."""
    found = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix in (".yaml", ".yml") and p.is_file() and p.name not in INVENTORY_NAMES \
                and p.name not in NOTIFY_NAMES:
            found.append(p)
    return found


def load_runbooks(paths: Iterable[Path], *, inventory: Path | None = None
                  ) -> tuple[list[Runbook], list[Problem]]:
    """Load files and folders; return the valid runbooks and all problems, names deduplicated.

    An inventory file among the paths is checked as an inventory; each inventory's problems
    are reported once, however many runbooks use it.
    """
    files: list[tuple[Path, Inventories]] = []
    problems: list[Problem] = []
    loose = Inventories(inventory)
    for p in paths:
        if p.is_dir():
            found = Inventories(inventory, root=p)
            files.extend((f, found) for f in runbook_files(p))
            problems.extend(_notify_file_problems(find_notify_file(p)))
        elif p.is_file() and p.name in NOTIFY_NAMES:
            problems.extend(_notify_file_problems(p))
        elif p.is_file() and p.name in INVENTORY_NAMES:
            checked = Inventories(p).for_runbook(p)
            if isinstance(checked, InventoryInvalid):
                problems.extend(checked.problems)
        elif p.is_file():
            files.append((p, loose))
        else:
            problems.append(Problem(str(p), 0, 0, "no such file or folder"))
    runbooks: list[Runbook] = []
    seen: dict[str, Runbook] = {}
    webhook_paths: dict[str, tuple[Runbook, WebhookTrigger]] = {}
    reported: set[Path] = set()
    for f, inventories in files:
        inventories.reported = reported
        rb, probs = _load(f, inventories=inventories)
        problems.extend(probs)
        if rb is None:
            continue
        if rb.name in seen:
            problems.append(Problem(str(f), *_name_mark(f), (
                f"the runbook name {rb.name!r} is already used by {seen[rb.name].path}; "
                "names must be unique (set `name:` to tell them apart)")))
            continue
        clash = _webhook_clash(rb, webhook_paths)
        if clash is not None:
            problems.append(clash)
            continue
        seen[rb.name] = rb
        runbooks.append(rb)
    return runbooks, problems


def _webhook_clash(rb: Runbook, paths: dict[str, tuple[Runbook, WebhookTrigger]]
                   ) -> Problem | None:
    """Runbooks may share a webhook path when they check it the same way (scheme, secret,
    shape): one request then goes to each of them. Otherwise the later one is refused, as a
    runbook whose name is taken is, since one request cannot be checked two ways."""
    mine = [t for t in rb.triggers if isinstance(t, WebhookTrigger)]
    for t in mine:
        other = paths.get(t.path)
        if other is not None and other[1].auth() != t.auth():
            o = other[1]
            return Problem(str(rb.path), *_text_mark(rb.path, t.path), (
                f"the webhook path {t.path} is already taken by {other[0].path} "
                f"({o.scheme}: {o.secret}, shape: {o.shape}); runbooks share a path only "
                "when they check it the same way, with the same shape; use another path, "
                f"or `{o.scheme}: {o.secret}` and `shape: {o.shape}`"))
    for t in mine:
        paths.setdefault(t.path, (rb, t))
    return None


def _text_mark(path: Path, text: str) -> tuple[int, int]:
    """Where `text` is first written in a file, for messages about a loaded runbook."""
    try:
        lines = path.read_text("utf-8", "replace").splitlines()
    except OSError:
        return (1, 1)
    for i, line in enumerate(lines, 1):
        if text in line:
            return (i, line.index(text) + 1)
    return (1, 1)


def _notify_file_problems(path: Path | None) -> list[Problem]:
    """The problems of a service-level notify file (none when there is no file)."""
    if path is None:
        return []
    try:
        load_notify_file(path)
    except NotifyFileInvalid as e:
        return e.problems
    return []


def _name_mark(path: Path) -> tuple[int, int]:
    try:
        text = path.read_text("utf-8", "replace")
    except OSError:
        return (1, 1)
    for i, line in enumerate(text.splitlines(), 1):
        if line.startswith("name:"):
            return (i, 1)
    return (1, 1)


def _list_command(folder: Path) -> str:
    """The `opsrun list` that shows FOLDER, for hints in messages."""
    return "opsrun list" if folder == Path(DEFAULT_RUNBOOKS) else f"opsrun list -r {folder}"


def find_runbook(ref: str, folder: Path, *, inventory: Path | None = None) -> Runbook:
    """A runbook by file path, or by name within the runbooks folder."""
    p = Path(ref)
    if p.suffix in (".yaml", ".yml") or "/" in ref:
        if not p.is_file():
            what = "it is a folder" if p.is_dir() else "there is no such file"
            raise UsageError(f"no runbook file {ref!r}: {what}; check the path, or give a "
                             f"runbook's name: `{_list_command(folder)}` shows them")
        return load_runbook(p, inventory=inventory)
    if not folder.is_dir():
        raise UsageError(f"no runbook named {ref!r}: the runbooks folder {folder} does not "
                         "exist; give the runbook's file, or the folder with --runbooks DIR "
                         f"(`opsrun init {folder}` creates one with a starter runbook)")
    candidates = [f for f in runbook_files(folder) if f.stem == ref]
    for f in candidates:
        runbook, problems = _load(f, inventories=Inventories(inventory, root=folder))
        if problems or runbook is None:
            raise RunbookInvalid(problems)
        return runbook
    runbooks, _ = load_runbooks([folder], inventory=inventory)
    for rb in runbooks:
        if rb.name == ref:
            return rb
    from opsrun.suggest import did_you_mean

    names = [rb.name for rb in runbooks]
    raise UsageError(f"no runbook named {ref!r} in {folder}{did_you_mean(ref, names)}; "
                     f"`{_list_command(folder)}` shows them all")


def load_runbook_bytes(raw: bytes, path: Path, *, inventory: Path | None = None) -> Runbook:
    """A runbook from the bytes of its file (as kept by the state store for a resumed run)."""
    runbook, problems = _load(path, raw, inventories=Inventories(inventory))
    if problems or runbook is None:
        raise RunbookInvalid(problems)
    return runbook


def _load(path: Path, raw: bytes | None = None, *, inventories: Inventories,
          using: tuple[Path, ...] = ()) -> tuple[Runbook | None, list[Problem]]:
    """Load one file; `using` holds the files whose `uses:` led here (to refuse cycles)."""
    try:
        if raw is None:
            raw = read_limited(path)
        doc = load_bytes(raw)
    except YamlError as e:
        return None, [Problem(str(path), e.line, e.col, e.message)]
    except OSError as e:
        return None, [Problem(str(path), 1, 1, f"cannot read the file: {e.strerror}")]
    problems = Problems()
    if not isinstance(doc.data, Mapping):
        kind = "a list" if isinstance(doc.data, list) else "a single value"
        return None, [Problem(str(path), *doc.mark(()), "the top level must be a mapping of "
                              f"keys (name:, on:, steps:, …); found {kind}")]
    data = schema.RUNBOOK.check(doc.data, (), problems)
    # Checks across the runbook run even when parts are wrong, on the parts that are right,
    # so one pass reports everything.
    whole = data if data is not INVALID else _partial_view(doc.data)
    _check_whole(whole, problems)
    inventory, inventory_problems = _check_hosts(whole, path, inventories, problems)
    used, used_problems = _check_uses(whole, path, inventories, (*using, path), problems)
    if problems or inventory_problems or used_problems:
        return None, inventory_problems + used_problems + problems.located(doc, path)
    warnings = tuple(Problem(str(path), *doc.mark(where), message, "warning")
                     for where, message in [*_approver_warnings(doc.data),
                                            *_journal_warnings(doc.data)])
    return _build(data, path, raw, inventory, used)._replace(warnings=warnings), []


def _approver_warnings(raw: Mapping[str, Any]) -> list[tuple[PathT, str]]:
    """Groups in `approvers:` that this machine does not have: nobody answers as one.

    A warning, not an error: runbooks are often checked (CI, pre-commit) on a machine
    other than the one that runs them.
    """
    import grp

    found: list[tuple[PathT, str]] = []
    for list_name in ("steps", "on_failure", "on_denied"):
        steps = raw.get(list_name)
        for i, step in enumerate(steps if isinstance(steps, list) else []):
            approvers = step.get("approvers") if isinstance(step, Mapping) else None
            for where, group in _approver_groups(approvers, (list_name, i, "approvers")):
                try:
                    grp.getgrnam(group)
                except KeyError:
                    found.append((where, f"{show_path(where)}: there is no group {group!r} "
                                  "on this machine (`getent group` does not know it), so "
                                  "nobody can answer as one of its members; check the name"))
    return found


def _journal_warnings(raw: Mapping[str, Any]) -> list[tuple[PathT, str]]:
    """Journal triggers on a machine without journalctl, or reading a folder that is not
    there: the runbook is valid (it may be meant for another machine) but will not fire."""
    import shutil

    found: list[tuple[PathT, str]] = []
    on = raw.get("on")
    items = [(("on", i), t) for i, t in enumerate(on)] if isinstance(on, list) else \
        [(("on",), {k: v}) for k, v in on.items()] if isinstance(on, Mapping) else []
    journalctl = None
    for at, trigger in items:
        spec = trigger.get("journal") if isinstance(trigger, Mapping) else None
        if not isinstance(spec, Mapping):
            continue
        where: PathT = (*at, "journal")
        journalctl = journalctl or shutil.which("journalctl") or "missing"
        if journalctl == "missing":
            found.append((where, f"{show_path(where)}: journalctl is not installed on this "
                          "machine (it is part of systemd), so this trigger cannot follow "
                          "the journal here; `opsrun watch` keeps trying until it can"))
        folder = spec.get("directory")
        if isinstance(folder, str) and not os.path.isdir(os.path.expanduser(folder)):
            found.append(((*where, "directory"), f"{show_path((*where, 'directory'))}: there "
                          f"is no folder {folder!r} on this machine; the trigger fires once "
                          "journal files appear there"))
    return found


def _approver_groups(approvers: Any, at: PathT) -> list[tuple[PathT, str]]:
    if isinstance(approvers, str):
        approvers = [approvers]
    if isinstance(approvers, list):
        return [((*at, j), a[len("group:"):]) for j, a in enumerate(approvers)
                if isinstance(a, str) and a.startswith("group:")]
    if not isinstance(approvers, Mapping):
        return []
    out = []
    for key in ("users", "groups"):
        items = approvers.get(key)
        listed = items if isinstance(items, list) else [items]
        for j, a in enumerate(listed):
            where = (*at, key, j) if isinstance(items, list) else (*at, key)
            if isinstance(a, str) and (key == "groups" or a.startswith("group:")):
                out.append((where, a.removeprefix("group:")))
    return out


# ── checks that need the whole runbook ─────────────────────────────────────

class _Scope(NamedTuple):
    params: set[str]
    env: set[str]
    steps_before: set[str]
    all_steps: set[str]
    event_fields: set[str] | None
    run_fields: tuple[str, ...] = RUN_FIELDS
    allow: tuple[str, ...] = expressions.ROOT_NAMES


def _check_whole(data: dict[str, Any], problems: Problems) -> None:
    triggers = _build_triggers(data["on"])
    step_lists = [(name, data[name]) for name in STEP_LISTS]
    all_ids = _check_ids(step_lists, problems)
    top_env = set(data["env"])
    fields = _event_fields(triggers)
    base = _Scope(set(data["params"]), top_env, set(), all_ids, fields)
    for name, value in data["env"].items():
        _check_env_name(("env", name), name, problems)
        _check_template(value, ("env", name), base._replace(allow=("event", "params", "run",
                                                                   "secrets")), problems)
    if data["concurrency"] is not None:
        _check_template(data["concurrency"]["key"], ("concurrency", "key"),
                        base._replace(allow=("event", "params")), problems)
    if data["throttle"] is not None:
        _check_template(data["throttle"]["key"], ("throttle", "key"),
                        base._replace(allow=("event", "params")), problems)
    main_ids: set[str] = set()
    for list_name, steps in step_lists:
        failing = list_name in ("on_failure", "on_denied")
        scope = base._replace(run_fields=RUN_FIELDS + (FAILURE_RUN_FIELDS if failing else ()))
        before = set(main_ids) if list_name != "steps" else set()
        added = _check_step_list(steps, (list_name,), scope, before, problems)
        if list_name == "steps":
            main_ids = added
    outputs_scope = base._replace(steps_before=main_ids,
                                  allow=("event", "params", "env", "steps", "run"))
    for name, value in (data.get("outputs") or {}).items():
        _check_template(value, ("outputs", name), outputs_scope, problems)


def _check_step_list(steps: list[dict[str, Any]], path: PathT, scope: _Scope, before: set[str],
                     problems: Problems, nested: str = "") -> set[str]:
    """Check steps in order; return the ids readable after them (their branches' included)."""
    seen = set(before)
    for i, step in enumerate(steps):
        at = (*path, i)
        _check_step(step, at, scope._replace(steps_before=set(seen)), problems, nested)
        inside = set(seen)
        for name, branch in _branches(step):
            seen |= _check_step_list(branch, (*at, "parallel", name), scope, inside, problems,
                                     "inside `parallel:` branches")
        if step["id"]:
            seen.add(step["id"])
    return seen


def _branches(step: Mapping[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """A checked step's branches (`parallel:` as a mapping of step lists)."""
    branches = step.get("parallel")
    if not isinstance(branches, Mapping):
        return []
    return [(name, [s for s in steps if isinstance(s, dict)])
            for name, steps in branches.items() if isinstance(steps, list)]


def _raw_steps(data: Mapping[str, Any]) -> Iterable[tuple[PathT, dict[str, Any]]]:
    """Every checked step with where it is written, branches included, in order."""
    def walk(steps: list[dict[str, Any]], path: PathT) -> Iterable[tuple[PathT, dict[str, Any]]]:
        for i, step in enumerate(steps):
            yield (*path, i), step
            for name, branch in _branches(step):
                yield from walk(branch, (*path, i, "parallel", name))

    for list_name in STEP_LISTS:
        yield from walk(data.get(list_name) or [], (list_name,))


def _partial_view(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The valid parts of a runbook that has problems, for the checks across it."""
    def valid(check: Any, value: Any, default: Any) -> Any:
        out = check.check(value, (), Problems()) if value is not None else default
        return default if out is INVALID else out

    def steps(key: str) -> list[dict[str, Any]]:
        items = raw.get(key)
        result = []
        for item in items if isinstance(items, list) else []:
            step = valid(schema.STEP, item, None)
            if step is None:
                step = _stub_step(item if isinstance(item, Mapping) else {})
            result.append(step)
        return result

    triggers = raw.get("on")
    trigger_list = triggers if isinstance(triggers, list) else []
    return {
        "on": [t for t in (valid(schema.Trigger(), t, None) for t in trigger_list) if t],
        "params": {k: None for k in (raw.get("params") or {})}
        if isinstance(raw.get("params"), Mapping) else {},
        "env": valid(schema.ENV, raw.get("env"), {}),
        "concurrency": valid(schema.CONCURRENCY, raw.get("concurrency"), None),
        "throttle": valid(schema.THROTTLE, raw.get("throttle"), None),
        "steps": steps("steps"), "on_failure": steps("on_failure"),
        "on_denied": steps("on_denied"), "on_success": steps("on_success"),
        "outputs": {},
    }


def _stub_step(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of an invalid step that expressions can still be checked in."""
    def text(key: str) -> str | None:
        value = raw.get(key)
        return value if isinstance(value, str) else None

    sid = text("id")
    env = schema.ENV.check(raw.get("env"), (), Problems()) if raw.get("env") else {}
    return {"id": sid if sid and re.fullmatch(schema.IDENT_RE, sid) else None,
            "run": text("run"), "confirm": text("confirm"), "workdir": text("workdir"),
            "uses": None, "emit": None, "with": {}, "parallel": None,
            # An invalid for_each is reported once; `item` in the step is not again.
            "for_each": None if raw.get("for_each") is None else [],
            "shell": text("shell"), "if": raw.get("if") if isinstance(raw.get("if"), str)
            else None, "env": env if env is not INVALID else {}}


def _check_ids(step_lists: list[tuple[str, list[dict[str, Any]]]],
               problems: Problems) -> set[str]:
    seen: dict[str, PathT] = {}
    for path, step in _raw_steps(dict(step_lists)):
        sid = step["id"]
        if sid is None:
            continue
        if sid in seen:
            problems.add((*path, "id"), f"{show_path(path)}.id: the step id {sid!r} "
                         f"is already used by {show_path(seen[sid])}; ids must be unique")
        else:
            seen[sid] = path
    return set(seen)


def _check_env_name(path: PathT, name: str, problems: Problems) -> None:
    if name.upper().startswith("OPSRUN_"):
        problems.add(path, f"{show_path(path)}: names starting with OPSRUN_ are set by "
                           "opsrun itself; choose another name", at_key=True)


def _check_step(step: dict[str, Any], path: PathT, scope: _Scope, problems: Problems,
                nested: str = "") -> None:
    if step.get("for_each") is not None:
        if isinstance(step["for_each"], str):
            _check_template(step["for_each"], (*path, "for_each"), scope, problems)
        scope = scope._replace(allow=(*scope.allow, *LOOP_NAMES))
    step_scope = scope._replace(env=scope.env | set(step["env"]))
    if nested and step.get("confirm") is not None:
        problems.add((*path, "confirm"), f"{show_path(path)}: a confirm step cannot be "
                     f"{nested}: a run waits for one answer at a time; ask before the "
                     "step that holds it", at_key=True)
    for key in ("emit", "with"):
        for where, text in _texts(step.get(key), (*path, key)):
            _check_template(text, where, step_scope, problems)
    for name, value in step["env"].items():
        _check_env_name((*path, "env", name), name, problems)
        _check_template(value, (*path, "env", name), scope, problems)
    if isinstance(step["if"], str):
        for ref in _refs(step["if"], (*path, "if"), 0, problems):
            _check_ref(ref, (*path, "if"), 0, step_scope, problems)
    for key in ("confirm", "workdir"):
        if step[key] is not None:
            _check_template(step[key], (*path, key), step_scope, problems)
    if step["run"] is not None:
        _check_run(step, path, step_scope, problems)
    if step.get("on_timeout") == "approve" and _limits_answerers(step.get("approvers")):
        problems.add((*path, "on_timeout"), f"{show_path((*path, 'on_timeout'))}: `approve` "
                     "would let the clock approve a step that `approvers:` limits to certain "
                     "people (four eyes); with approvers, a timeout denies: remove "
                     "`on_timeout: approve`")


def _texts(value: Any, path: PathT) -> Iterable[tuple[PathT, str]]:
    """The texts inside a JSON-like value, with where each is."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _texts(v, (*path, str(k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _texts(v, (*path, i))


def _limits_answerers(approvers: Any) -> bool:
    if isinstance(approvers, Mapping):
        return bool(approvers.get("users") or approvers.get("groups")
                    or approvers.get("not_starter"))
    return bool(approvers)


def _check_run(step: dict[str, Any], path: PathT, scope: _Scope, problems: Problems) -> None:
    text = step["run"]
    _check_template(text, (*path, "run"), scope, problems)
    shell = step["shell"] or "bash"
    if not expressions.has_expressions(text):
        return
    if not shell_words.is_posix_shell(shell):
        problems.add((*path, "shell"), f"{show_path(path)}: `${{{{ … }}}}` in `run:` needs a "
                     f"POSIX shell to quote values safely, and {shell!r} is not one; pass "
                     "values through `env:` and read them from the environment", at_key=True)
        return
    try:
        shell_words.plan(text)
    except shell_words.ShellContextError as e:
        problems.add((*path, "run"), f"{show_path((*path, 'run'))}: {e.message}",
                     offset=e.offset)


def _check_template(text: str, path: PathT, scope: _Scope, problems: Problems) -> None:
    try:
        parts = expressions.split(text)
    except expressions.ExpressionSyntaxError as e:
        problems.add(path, f"{show_path(path)}: {e.message}", offset=e.offset)
        return
    for part in parts:
        if isinstance(part, expressions.Expr):
            for ref in _refs(part.source, path, part.offset, problems):
                _check_ref(ref, path, part.offset, scope, problems)


def _refs(source: str, path: PathT, offset: int,
          problems: Problems) -> list[expressions.Ref]:
    try:
        return expressions.check(source)
    except expressions.ExpressionSyntaxError as e:
        problems.add(path, f"{show_path(path)}: {e.message}", offset=offset)
        return []


def _check_ref(ref: expressions.Ref, path: PathT, offset: int, scope: _Scope,
               problems: Problems) -> None:
    from opsrun.suggest import did_you_mean

    where = show_path(path)
    if ref.root not in scope.allow:
        if ref.root in LOOP_NAMES:
            msg = f"`{ref.root}` is only known in a step with `for_each:`"
        elif ref.root in expressions.ROOT_NAMES:
            msg = f"`{ref.root}` cannot be used here; this field can read {', '.join(scope.allow)}"
        else:
            msg = (f"unknown name {ref.root!r}{did_you_mean(ref.root, scope.allow)}; "
                   f"expressions can read {', '.join(scope.allow)}")
        problems.add(path, f"{where}: {msg}", offset=offset)
        return
    if ref.key is None:
        return
    known: Iterable[str] | None = {
        "params": scope.params, "env": scope.env, "run": scope.run_fields,
        "event": scope.event_fields,
    }.get(ref.root)
    if ref.root == "steps":
        if ref.key not in scope.all_steps:
            problems.add(path, f"{where}: there is no step with id {ref.key!r}"
                         f"{did_you_mean(ref.key, scope.all_steps)}", offset=offset)
        elif ref.key not in scope.steps_before:
            problems.add(path, f"{where}: step {ref.key!r} has not run yet at this point; an "
                         "expression can only read steps that come before it", offset=offset)
        return
    if known is not None and ref.key not in known:
        what = {"params": "param", "env": "env variable", "run": "run field",
                "event": "event field"}[ref.root]
        names = sorted(known)
        hint = did_you_mean(ref.key, names)
        listing = ", ".join(names) if names else "none"
        extra = " (the triggers of this runbook provide these)" if ref.root == "event" else ""
        problems.add(path, f"{where}: unknown {what} {ref.key!r}{hint}; known: "
                           f"{listing}{extra}", offset=offset)


def _host_names(step: dict[str, Any], path: PathT) -> list[tuple[PathT, str]]:
    """The names a run step's `host:`/`hosts:` give, each with where it was written."""
    if step.get("run") is None:
        return []
    hosts = step.get("hosts")
    if isinstance(hosts, list) and hosts:
        return [((*path, "hosts", j), h) for j, h in enumerate(hosts) if isinstance(h, str)]
    host = step.get("host")
    return [((*path, "host"), host)] if isinstance(host, str) else []


def _check_hosts(data: dict[str, Any], path: Path, inventories: Inventories,
                 problems: Problems) -> tuple[Inventory, list[Problem]]:
    """Every host and group a step names must be known; the inventory is read only if needed."""
    named = [n for at, step in _raw_steps(data) for n in _host_names(step, at)]
    if not named:
        return Inventory(None), []
    found = inventories.for_runbook(path)
    if isinstance(found, InventoryInvalid):
        first = found.problems[0].file if found.problems else "the inventory"
        where = named[0][0][:-1] if named[0][0][-1] != "host" else named[0][0]
        problems.add(where, f"{show_path(where)}: the host names cannot be checked: the "
                     f"inventory {first} has problems (shown with its name); fix it first",
                     at_key=True)
        if Path(first) in inventories.reported:
            return Inventory(None), []
        inventories.reported.add(Path(first))
        return Inventory(None), list(found.problems)
    for where, name in named:
        why = found.problem_with(name)
        if why is not None:
            problems.add(where, f"{show_path(where)}: {why}")
    return found, []


# ── uses: other runbooks ───────────────────────────────────────────────────

def used_file(ref: str, caller: Path) -> Path | None:
    """The file a `uses:` names: a path beside the caller, or a runbook file by its name
    in the caller's folder; None when there is none."""
    folder = caller.parent
    if "/" in ref or ref.endswith((".yaml", ".yml")):
        candidate = folder / ref
        return candidate if candidate.is_file() else None
    for suffix in (".yaml", ".yml"):
        candidate = folder / f"{ref}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _check_uses(data: Mapping[str, Any], path: Path, inventories: Inventories,
                using: tuple[Path, ...], problems: Problems
                ) -> tuple[dict[str, Runbook], list[Problem]]:
    """Load the runbooks that `uses:` steps name, and check their inputs; refuse cycles."""
    used: dict[str, Runbook] = {}
    others: list[Problem] = []
    for at, step in _raw_steps(data):
        ref = step.get("uses")
        if not isinstance(ref, str):
            continue
        child = used.get(ref)
        if child is None:
            child = _load_used(ref, (*at, "uses"), path, inventories, using, problems, others)
            if child is None:
                continue
            used[ref] = child
        _check_inputs(step.get("with") or {}, child, at, problems)
    return used, others


def _load_used(ref: str, at: PathT, path: Path, inventories: Inventories,
               using: tuple[Path, ...], problems: Problems, others: list[Problem]
               ) -> Runbook | None:
    where = show_path(at)
    found = used_file(ref, path)
    if found is None:
        names = sorted(p.stem for p in path.parent.glob("*.y*ml") if p != path)
        from opsrun.suggest import did_you_mean

        problems.add(at, f"{where}: there is no runbook {ref!r} beside this one in "
                     f"{path.parent}{did_you_mean(ref, names)}; give a runbook's file name "
                     "(without .yaml) or a path like ./restart.yaml")
        return None
    chain = [p.resolve() for p in using]
    if found.resolve() in chain:
        loop = " → ".join(p.name for p in [*using[chain.index(found.resolve()):], found])
        problems.add(at, f"{where}: runbooks that use each other would never end: {loop}; "
                     "remove one of these `uses:`")
        return None
    child, child_problems = _load(found, inventories=inventories, using=using)
    if child is None:
        cycle = [p for p in child_problems if "would never end" in p.message]
        problems.add(at, f"{where}: the runbook {ref!r} ({found}) has "
                     f"{len(child_problems)} problem{'s' * (len(child_problems) != 1)}, shown "
                     "with its file name; fix it first")
        if not cycle:
            others.extend(child_problems)
        return None
    asks = [s.id for s in child.all_steps() if s.kind == "confirm"]
    if asks:
        problems.add(at, f"{where}: the runbook {ref!r} asks for confirmation (step "
                     f"{asks[0]!r}), and a used runbook cannot: one run waits for one answer "
                     "at a time; put the confirm step in this runbook, before this step")
        return None
    return child


def _check_inputs(given: Mapping[str, Any], child: Runbook, at: PathT,
                  problems: Problems) -> None:
    """`with:` against the used runbook's params: known names, required ones given, types."""
    from opsrun.params import ParamError, coerce_value
    from opsrun.suggest import did_you_mean

    for name, value in given.items():
        where = (*at, "with", name)
        param = child.params.get(name)
        if param is None:
            known = ", ".join(child.params) or "none"
            problems.add(where, f"{show_path(where)}: {child.name!r} has no param {name!r}"
                         f"{did_you_mean(name, child.params)}; its params: {known}",
                         at_key=True)
            continue
        if isinstance(value, str) and expressions.has_expressions(value):
            continue  # its type is checked when the run renders it
        try:
            coerce_value(param, value)
        except ParamError as e:
            problems.add(where, f"{show_path(where)}: {e} (the param {name!r} of "
                         f"{child.name!r} is {param.type})")
    for name, param in child.params.items():
        if param.required and param.default is None and name not in given:
            problems.add((*at, "uses"), f"{show_path(at)}: {child.name!r} needs the param "
                         f"{name!r}; give it in `with:` ({name}: …)", at_key=True)


# ── building the immutable model ───────────────────────────────────────────

def _build(data: dict[str, Any], path: Path, raw: bytes, inventory: Inventory,
           used: Mapping[str, Runbook]) -> Runbook:
    params = {name: Param(name=name, type=p["type"], description=p["description"],
                          default=p["default"], required=p["required"], pattern=p["pattern"],
                          choices=tuple(p["choices"]))
              for name, p in data["params"].items()}
    conc = data["concurrency"] or {"key": "", "policy": "queue"}
    return Runbook(
        name=data["name"] or path.stem,
        path=path,
        sha256=sha256_hex(raw),
        source=raw,
        description=data["description"],
        triggers=_build_triggers(data["on"]),
        params=params,
        env=dict(data["env"]),
        concurrency=Concurrency(conc["key"], conc["policy"]),
        throttle=_build_throttle(data["throttle"]),
        timeout_s=data["timeout"],
        steps=_build_steps(data["steps"], "step", inventory, used),
        on_failure=_build_steps(data["on_failure"], "on_failure", inventory, used),
        on_denied=_build_steps(data["on_denied"], "on_denied", inventory, used),
        on_success=_build_steps(data["on_success"], "on_success", inventory, used),
        outputs=dict(data["outputs"]),
        notify=build_notify_targets(data["notify"]),
    )


def _build_throttle(raw: dict[str, Any] | None) -> Throttle | None:
    if raw is None:
        return None
    mode = "once_within" if raw["once_within"] is not None else "once_after"
    return Throttle(mode, raw[mode], raw["key"])


def _build_triggers(raw: list[dict[str, Any]]) -> tuple[Trigger, ...]:
    out: list[Trigger] = []
    for item in raw:
        (kind, t), = item.items()
        if kind == "file":
            out.append(FileTrigger(tuple(t["paths"]), tuple(t["events"]), t["debounce"],
                                   tuple(t["ignore"])))
        elif kind == "schedule":
            out.append(ScheduleTrigger(t["cron"], t["timezone"], t["catch_up"], t["jitter"]))
        elif kind == "log":
            out.append(LogTrigger(t["path"], t["match"], t["from"]))
        elif kind == "webhook":
            scheme = "token" if t["token"] is not None else "hmac"
            out.append(WebhookTrigger(t["path"], scheme, t[scheme], t["shape"],
                                      parse_where(t["where"] or {})))
        elif kind == "journal":
            out.append(JournalTrigger(
                tuple(t["unit"]), t["priority"], t["match"],
                tuple((k, tuple(v)) for k, v in sorted(t["fields"].items())), t["from"],
                os.path.expanduser(t["directory"]) if t["directory"] is not None else None))
        else:
            out.append(EventTrigger(parse_where(t["where"] or {})))
    return tuple(out)


def _build_steps(raw: list[dict[str, Any]], prefix: str, inventory: Inventory,
                 used: Mapping[str, Runbook]) -> tuple[Step, ...]:
    return tuple(_build_step(s, i, prefix, inventory, used) for i, s in enumerate(raw))


def _build_step(s: dict[str, Any], index: int, prefix: str, inventory: Inventory,
                used: Mapping[str, Runbook]) -> Step:
    kind = schema.step_kind(s) or "run"
    sid = s["id"] or f"{prefix}-{index + 1}"
    branches = tuple((name, _build_steps(steps, f"{sid}.{name}", inventory, used))
                     for name, steps in s["parallel"].items()) \
        if kind == "parallel" else ()
    retry = s["retry"]
    if isinstance(retry, int):
        retry_obj = Retry(attempts=retry)
    elif retry:
        retry_obj = Retry(retry["attempts"], retry["delay"], retry["backoff"],
                          retry["max_delay"], retry["jitter"], tuple(retry["on"]),
                          tuple(retry["on_exit_codes"]))
    else:
        retry_obj = Retry()
    approvers = s["approvers"]
    if isinstance(approvers, str):
        approvers = [approvers]
    if isinstance(approvers, list):
        users = tuple(a for a in approvers if not a.startswith("group:"))
        groups = tuple(a[len("group:"):] for a in approvers if a.startswith("group:"))
        appr = Approvers(users, groups, False)
    elif approvers:
        users = tuple(a for a in approvers["users"] if not a.startswith("group:"))
        # `groups: [ops]` and `groups: ["group:ops"]` mean the same group.
        groups = tuple(g.removeprefix("group:") for g in approvers["groups"]) + tuple(
            a[len("group:"):] for a in approvers["users"] if a.startswith("group:"))
        appr = Approvers(users, groups, approvers["not_starter"])
    else:
        appr = Approvers()
    shell = s["shell"] or "bash"
    plan = None
    if kind == "run" and shell_words.is_posix_shell(shell):
        plan = shell_words.plan(s["run"])
    hosts = tuple(s["hosts"]) or ((s["host"],) if s["host"] else ())
    for_each = s["for_each"]
    return Step(
        id=sid,
        kind=kind,
        position=index,
        name=s["name"] or "",
        run=s["run"],
        confirm=s["confirm"],
        condition=s["if"],
        env=dict(s["env"]),
        timeout_s=s["timeout"],
        retry=retry_obj,
        continue_on_error=s["continue_on_error"],
        hosts=hosts,
        parallel=s["parallel"] if isinstance(s["parallel"], int) else 1,
        workdir=s["workdir"],
        shell=shell,
        approvers=appr,
        on_timeout=s["on_timeout"] or "deny",
        explicit_id=s["id"] is not None,
        plan=plan,
        targets=inventory.expand(hosts) if kind == "run" else (),
        emit=s["emit"],
        uses=s["uses"],
        used=used.get(s["uses"]) if s["uses"] is not None else None,
        inputs=dict(s["with"]),
        branches=branches,
        for_each=tuple(for_each) if isinstance(for_each, list) else for_each,
        max_parallel=s["max_parallel"] or 1,
        fail_fast=True if s["fail_fast"] is None else s["fail_fast"],
    )
