"""opsrun explain: whether an event would start a runbook, and which condition fails if not."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from opsrun import output, paths
from opsrun import params as params_mod
from opsrun.event import Event, from_object
from opsrun.explain import TriggerVerdict, explain
from opsrun.matcher import SOURCE_KINDS
from opsrun.runbook import Runbook, find_runbook
from opsrun.runs import throttle
from opsrun.runs.throttle import explain_text
from opsrun.store import Store
from opsrun.throttle_window import ONCE_AFTER


def main(ref: str, folder: Path, *, event_arg: str, as_json: bool,
         state_dir: str | None = None) -> int:
    """Explain each trigger of a runbook for one event; exit 0 if it starts a run, else 1
    (a throttle window that holds the event back counts as no run)."""
    from opsrun.commands.run import read_raw_event

    rb = find_runbook(ref, folder)
    event = as_source_event(read_raw_event(event_arg))
    verdicts = explain(rb, event)
    with state_store(state_dir) as store:
        held = throttle_verdict(rb, event, verdicts, store)
    starts = any(v.matches for v in verdicts) and (held is None or held["runs_now"]
                                                   or held["mode"] == ONCE_AFTER)
    if as_json:
        output.print_json({"version": 1, "runbook": rb.name, "event_id": event.id,
                           "starts": starts, "triggers": [_row(v) for v in verdicts],
                           "throttle": held})
    else:
        print_verdicts(rb, verdicts, throttle=held)
    return 0 if starts else 1


@contextmanager
def state_store(state_dir: str | None) -> Iterator[Store | None]:
    """The state store, when the state folder has one (explain never creates it)."""
    folder = paths.state_dir_from_env(state_dir)
    if not (folder / paths.STATE_DB).exists():
        yield None
        return
    with Store.open(folder) as store:
        yield store


def throttle_verdict(rb: Runbook, event: Event, verdicts: list[TriggerVerdict],
                     store: Store | None) -> dict[str, Any] | None:
    """What the runbook's throttle does with the event, if a trigger takes it."""
    if rb.throttle is None or not any(v.matches for v in verdicts):
        return None
    try:
        typed = params_mod.resolve(rb.params, {})
    except params_mod.ParamError:
        return None
    return throttle.explain(rb, event.data, typed, store)


def as_source_event(data: dict[str, Any]) -> Event:
    """The event as its `source` field says it came: file, log or schedule events can be
    explained from their JSON; anything else is a JSON event."""
    source = data.get("source")
    return from_object(data, source if source in SOURCE_KINDS else "json")


def print_verdicts(rb: Runbook, verdicts: list[TriggerVerdict], indent: str = "",
                   throttle: dict[str, Any] | None = None) -> None:
    """The answer for one runbook: its verdict, then a line per trigger, then what its
    throttle does."""
    first = next((v for v in verdicts if v.matches), None)
    name = output.safe(rb.name, keep_newlines=False)
    if not verdicts:
        print(f"{indent}{name}: no run: it has no triggers (it runs only by hand)")
        return
    head = f"starts a run (on[{first.position}], {first.kind})" if first else "no run"
    if first and throttle is not None and not throttle["runs_now"]:
        head = ("no run now: one when the throttle window ends" if throttle["mode"] ==
                ONCE_AFTER else "no run: throttled")
    print(f"{indent}{name}: {head}")
    for v in verdicts:
        verdict = "yes" if v.matches else "no: " + "; ".join(v.reasons)
        print(f"{indent}  on[{v.position}] {v.kind}: {output.safe(verdict, keep_newlines=False)}")
    if throttle is not None:
        print(f"{indent}  " + output.safe(explain_text(throttle), keep_newlines=False))


def _row(v: TriggerVerdict) -> dict[str, Any]:
    return {"index": v.position, "key": v.key, "kind": v.kind, "matches": v.matches,
            "reasons": list(v.reasons)}


def explain_rows(runbooks: list[Runbook], event: Event,
                 store: Store | None = None) -> list[dict[str, Any]]:
    """For `dispatch --explain --json`: every runbook with a trigger of the event's kind."""
    kind = SOURCE_KINDS.get(event.source)
    out = []
    for rb in runbooks:
        if any(t.kind == kind for t in rb.triggers):
            verdicts = explain(rb, event)
            row: dict[str, Any] = {"runbook": rb.name,
                                   "starts": any(v.matches for v in verdicts),
                                   "triggers": [_row(v) for v in verdicts]}
            if rb.throttle is not None:
                row["throttle"] = throttle_verdict(rb, event, verdicts, store)
            out.append(row)
    return out
