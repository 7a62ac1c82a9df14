"""opsrun explain: whether an event would start a runbook, and which condition fails if not."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from opsrun import output
from opsrun.event import Event, from_object
from opsrun.explain import TriggerVerdict, explain
from opsrun.matcher import SOURCE_KINDS
from opsrun.runbook import Runbook, find_runbook


def main(ref: str, folder: Path, *, event_arg: str, as_json: bool) -> int:
    """Explain each trigger of a runbook for one event; exit 0 if it starts a run, else 1."""
    from opsrun.commands.run import read_raw_event

    rb = find_runbook(ref, folder)
    event = as_source_event(read_raw_event(event_arg))
    verdicts = explain(rb, event)
    starts = any(v.matches for v in verdicts)
    if as_json:
        output.print_json({"version": 1, "runbook": rb.name, "event_id": event.id,
                           "starts": starts, "triggers": [_row(v) for v in verdicts]})
    else:
        print_verdicts(rb, verdicts)
    return 0 if starts else 1


def as_source_event(data: dict[str, Any]) -> Event:
    """The event as its `source` field says it came: file, log or schedule events can be
    explained from their JSON; anything else is a JSON event."""
    source = data.get("source")
    return from_object(data, source if source in SOURCE_KINDS else "json")


def print_verdicts(rb: Runbook, verdicts: list[TriggerVerdict], indent: str = "") -> None:
    """The answer for one runbook: its verdict, then a line per trigger."""
    first = next((v for v in verdicts if v.matches), None)
    name = output.safe(rb.name, keep_newlines=False)
    if not verdicts:
        print(f"{indent}{name}: no run: it has no triggers (it runs only by hand)")
        return
    print(f"{indent}{name}: " + (f"starts a run (on[{first.position}], {first.kind})" if first
                                 else "no run"))
    for v in verdicts:
        verdict = "yes" if v.matches else "no: " + "; ".join(v.reasons)
        print(f"{indent}  on[{v.position}] {v.kind}: {output.safe(verdict, keep_newlines=False)}")


def _row(v: TriggerVerdict) -> dict[str, Any]:
    return {"index": v.position, "key": v.key, "kind": v.kind, "matches": v.matches,
            "reasons": list(v.reasons)}


def explain_rows(runbooks: list[Runbook], event: Event) -> list[dict[str, Any]]:
    """For `dispatch --explain --json`: every runbook with a trigger of the event's kind."""
    kind = SOURCE_KINDS.get(event.source)
    out = []
    for rb in runbooks:
        if any(t.kind == kind for t in rb.triggers):
            verdicts = explain(rb, event)
            out.append({"runbook": rb.name, "starts": any(v.matches for v in verdicts),
                        "triggers": [_row(v) for v in verdicts]})
    return out
