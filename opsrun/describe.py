"""Short human descriptions of triggers and steps, shared by list, show and --dry-run."""
from __future__ import annotations

import json

from opsrun.criteria import Criteria
from opsrun.durations import format_duration
from opsrun.runbook import (
    EventTrigger,
    FileTrigger,
    JournalTrigger,
    LogTrigger,
    Runbook,
    ScheduleTrigger,
    Step,
    Throttle,
    Trigger,
    WebhookTrigger,
)


def trigger_short(t: Trigger) -> str:
    """One word-ish form for tables: `log:/var/log/x`, `schedule:*/5 * * * *`."""
    if isinstance(t, FileTrigger):
        return "file:" + ",".join(t.paths)
    if isinstance(t, ScheduleTrigger):
        return f"schedule:{t.cron}" + ("" if t.timezone == "UTC" else f" ({t.timezone})")
    if isinstance(t, LogTrigger):
        return f"log:{t.path}"
    if isinstance(t, WebhookTrigger):
        return f"webhook:{t.path}"
    if isinstance(t, JournalTrigger):
        return "journal:" + (",".join(t.units) or "*")
    conds = ",".join(f"{c.field}" + ("=" + _v(c.value) if c.op == "eq" else f" {c.op} {_v(c.value)}")
                     for c in t.where.conditions)
    return "event" + (f":{conds}" if conds else "")


def trigger_long(t: Trigger) -> str:
    """A full sentence-like line for `opsrun show`."""
    if isinstance(t, FileTrigger):
        text = f"file      {', '.join(t.paths)}  on {', '.join(t.events)}"
        text += f"  debounce {format_duration(t.debounce_s)}"
        if t.ignore:
            text += f"  ignore {', '.join(t.ignore)}"
        return text
    if isinstance(t, ScheduleTrigger):
        text = f"schedule  {t.cron}  ({t.timezone})"
        if t.catch_up != "none":
            text += f"  catch_up {t.catch_up}"
        if t.jitter_s:
            text += f"  jitter {format_duration(t.jitter_s)}"
        return text
    if isinstance(t, LogTrigger):
        text = f"log       {t.path}  from {t.start_at}"
        if t.match is not None:
            text += f"  match {t.match}"
            groups = list(t.pattern.groupindex) if t.pattern else []
            if groups:
                text += f"  (fields: {', '.join(groups)})"
        return text
    if isinstance(t, JournalTrigger):
        return "journal   " + journal_text(t)
    if isinstance(t, WebhookTrigger):
        text = f"webhook   {t.path}  {t.scheme} {t.secret}  shape {t.shape}"
        return text + (f"  where {where_text(t)}" if t.where.conditions else "")
    return "event     " + (where_text(t) or "every event")


def journal_text(t: JournalTrigger) -> str:
    """`unit web.service  priority err or more severe  match …` for a journal trigger."""
    from opsrun.journal_entries import PRIORITIES

    parts = [f"unit {' or '.join(t.units)}" if t.units else "every unit"]
    if t.priority is not None:
        parts.append(f"priority {PRIORITIES[t.priority]} or more severe")
    parts += [f"{name} = {' or '.join(values)}" for name, values in t.field_matches]
    if t.match is not None:
        parts.append(f"match {t.match}")
        groups = list(t.pattern.groupindex) if t.pattern else []
        if groups:
            parts.append(f"(fields: {', '.join(groups)})")
    parts.append(f"from {t.start_at}")
    if t.directory is not None:
        parts.append(f"in {t.directory}")
    return "  ".join(parts)


def where_text(t: EventTrigger | WebhookTrigger) -> str:
    return _criteria_text(t.where)


def _criteria_text(where: Criteria) -> str:
    parts = [f"{c.field} = {_v(c.value)}" if c.op == "eq" else f"{c.field} {c.op} {_v(c.value)}"
             for c in where.conditions]
    parts += [f"all of ({_criteria_text(g)})" for g in where.all_of]
    if where.any_of:
        parts.append("any of (" + " | ".join(_criteria_text(g) for g in where.any_of) + ")")
    parts += [f"not ({_criteria_text(g)})" for g in where.none_of]
    return ", ".join(parts)


def _v(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def step_facts(step: Step) -> list[str]:
    """Conditions and settings of a step, each a short phrase."""
    facts = []
    if step.for_each is not None:
        items = step.for_each if isinstance(step.for_each, str) else json.dumps(
            list(step.for_each), default=str)
        facts.append(f"for each item of {items}" + (f", {step.max_parallel} at a time"
                                                    if step.max_parallel > 1 else ""))
    if step.kind == "parallel" or (step.for_each is not None and step.max_parallel > 1):
        facts.append("the first failure stops the others" if step.fail_fast
                     else "a failure lets the others finish")
    if step.condition is not None:
        facts.append(f"if: {step.condition}")
    if step.hosts:
        facts.append(f"on hosts: {', '.join(step.hosts)}" + (f" ({step.parallel} at once)"
                                                             if step.parallel > 1 else ""))
    if step.workdir:
        facts.append(f"in {step.workdir}")
    if step.shell != "bash":
        facts.append(f"shell {step.shell}")
    if step.retry.attempts > 1:
        r = step.retry
        facts.append(f"retry {r.attempts} times, {format_duration(r.delay_s)} apart"
                     + (f", backoff ×{r.backoff:g}" if r.backoff != 1 else "")
                     + (f", at most {format_duration(r.max_delay_s)}"
                        if r.max_delay_s is not None else "")
                     + (", full jitter" if r.jitter == "full" else "")
                     + ("" if set(r.on) == {"failure", "timed_out"} else
                        f", on {' and '.join(r.on)}")
                     + (f", after exit code {', '.join(map(str, r.on_exit_codes))}"
                        if r.on_exit_codes else ""))
    if step.timeout_s is not None:
        facts.append(f"timeout {format_duration(step.timeout_s)}")
    if step.continue_on_error:
        facts.append("continue on error")
    if step.kind == "confirm":
        a = step.approvers
        who = ", ".join(list(a.users) + [f"group:{g}" for g in a.groups]) or "anyone"
        facts.append(f"approvers: {who}" + (" (not the user who started the run)"
                                            if a.not_starter else ""))
        facts.append(f"on timeout: {step.on_timeout}")
    return facts


def throttle_text(t: Throttle) -> str:
    """`once_within 10m00s per key ${{ event.alertname }}: the first event runs, …`."""
    per = f"per key {t.key}" if t.key else "one window for all events"
    what = ("the first event of a window runs, the rest of it are recorded as run.throttled"
            if t.mode == "once_within" else
            "every event is recorded as run.throttled; when the window ends, one run with "
            "the last")
    return f"{t.mode} {format_duration(t.window_s)}, {per}: {what}"


def runbook_triggers_short(rb: Runbook) -> str:
    return "; ".join(trigger_short(t) for t in rb.triggers) or "manual"


def describe_answer(approved: bool, by: str | None, how: str | None) -> str:
    """An answer as a person reads it: `approved by alice (command)`, `denied: no answer in
    time`, `denied: the run was cancelled`."""
    verdict = "approved" if approved else "denied"
    if how == "timeout":
        return f"{verdict}: no answer in time"
    if how == "cancel":
        return f"{verdict}: the run was cancelled"
    return f"{verdict} by {by or '?'} ({how or '?'})"
