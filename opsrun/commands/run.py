"""opsrun run: run one runbook now, step by step, in this terminal."""
from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from opsrun import engine as engine_mod
from opsrun import identity, output, secrets
from opsrun import params as params_mod
from opsrun.errors import UsageError
from opsrun.event import Event, EventRejected, from_object, new_event, parse_json_event
from opsrun.ids import new_id
from opsrun.inventory import check_option as check_inventory_option
from opsrun.run_types import Cancel, RunResult
from opsrun.runbook import Runbook, Step, find_runbook
from opsrun.runs.context import open_run_context
from opsrun.runs.driver_lock import driving


def main(ref: str, folder: Path, *, param_args: list[str], event_arg: str | None,
         dry_run: bool, yes: bool, as_json: bool, state_dir: str | None,
         audit_log: str | None, secrets_file: str | None, inventory: Path | None = None,
         accept_new_hosts: bool = False) -> int:
    """Run a runbook (or show what it would do) and return the run's exit code."""
    check_inventory_option(inventory)
    rb = find_runbook(ref, folder, inventory=inventory)
    for warning in rb.warnings:
        print(output.safe(str(warning)), file=sys.stderr)
    given = parse_param_args(param_args)
    try:
        typed = params_mod.resolve(rb.params, given)
    except params_mod.ParamError as e:
        raise UsageError(str(e)) from None
    event = read_event(event_arg)
    secret_values = secrets.load(Path(secrets_file) if secrets_file else None)
    starter = identity.current()
    req = engine_mod.RunRequest(rb, new_id(), event, typed, starter, trigger="manual")
    if dry_run:
        eng = engine_mod.Engine({}, [], secrets=secret_values)
        return print_plan(rb, engine_mod.plan(eng, req), as_json=as_json)
    if yes:
        from opsrun.approvals import check_flag_may_answer

        check_flag_may_answer(rb.all_steps(), starter, starter.user)
    reporter = output.reporter(as_json)
    with open_run_context(state_dir, audit_log, secret_values,
                          accept_new_hosts=accept_new_hosts) as rc, \
            driving(rc.state_dir, req.run_id, rc.store):
        asks = any(s.kind == "confirm" for s in rb.all_steps())
        eng = rc.engine([reporter], confirmer=rc.confirmer(yes=yes, who=starter)
                        if asks else None)
        result = run_with_signals(eng, req)
    if as_json:
        output.print_json(result_document(result, rb))
    return result.exit_code


def parse_param_args(args: list[str]) -> dict[str, str]:
    """`-p name=value` pairs; a repeated name is an error, not a silent override."""
    out: dict[str, str] = {}
    for arg in args:
        name, sep, value = arg.partition("=")
        if not sep or not name:
            raise UsageError(f"-p {arg!r}: write params as -p name=value")
        if name in out:
            raise UsageError(f"-p {name}=… is given twice ({out[name]!r}, then {value!r}); "
                             "give each param once")
        out[name] = value
    return out


def read_event(arg: str | None) -> Event:
    """The event the run sees: --event JSON, @file, - (stdin), or a manual event."""
    if arg is None:
        return new_event("manual")
    return from_object(read_raw_event(arg), "manual")


def read_raw_event(arg: str) -> dict[str, Any]:
    """The JSON object of --event JSON, @file or - (stdin), checked like any event."""
    if arg == "-":
        raw = sys.stdin.buffer.read()
        where = "stdin"
    elif arg.startswith("@"):
        try:
            raw = Path(arg[1:]).read_bytes()
        except OSError as e:
            raise UsageError(f"--event {arg}: cannot read the file: {e.strerror}") from None
        where = arg[1:]
    else:
        raw = arg.encode("utf-8", "surrogateescape")
        where = "--event"
    try:
        parsed = parse_json_event(raw.strip(), source="manual")
    except EventRejected as e:
        raise UsageError(f"the event from {where} was rejected: {e}") from None
    return dict(parsed.data)


@contextmanager
def _signals_cancel(cancel: threading.Event) -> Iterator[None]:
    """SIGINT/SIGTERM stop the run cleanly; a second Ctrl-C stops waiting for the cleanup."""
    def handler(signum: int, frame: FrameType | None) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        print(f"\nopsrun: {signal.Signals(signum).name} received: stopping the run "
              "(press Ctrl-C again to stop waiting)", file=sys.stderr)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_with_signals(eng: engine_mod.Engine, req: engine_mod.RunRequest) -> RunResult:
    cancel = Cancel()
    with _signals_cancel(cancel):
        return eng.run(req, cancel)


def result_document(result: Any, rb: Runbook) -> dict[str, Any]:
    """The --json document: the run and every step result."""
    return {
        "version": 1,
        "run": {"id": result.run_id, "runbook": rb.name, "file": str(rb.path),
                "sha256": rb.sha256, "state": result.state, "exit_code": result.exit_code,
                "failed_step": result.failed_step, "error": result.error,
                "duration": round(result.duration, 3), "waiting_step": result.waiting_step},
        "steps": [{"id": s.id, "outcome": s.outcome, "exit_code": s.exit_code,
                   "duration": round(s.duration, 3), "attempts": s.attempts,
                   "stdout": s.stdout, "stderr": s.stderr, "outputs": s.outputs,
                   "hosts": s.hosts, "error": s.error, "answer": s.answer}
                  for s in result.steps],
    }


def print_plan(rb: Runbook, planned: list[engine_mod.PlannedStep], *, as_json: bool) -> int:
    """Show a dry run: every step rendered, with what it would do."""
    if as_json:
        output.print_json({"version": 1, "dry_run": True, "runbook": rb.name, "steps": [
            {"section": p.section, "id": p.step.id, "kind": p.step.kind, "within": p.within,
             "verdict": p.verdict, "note": p.note,
             "command": p.command, "hosts": [h.name for h in p.step.targets],
             "parallel": p.step.parallel if p.step.targets else None} for p in planned],
            "notify": [t.as_record() for t in rb.notify]})
        return 2 if any(p.verdict == "error" for p in planned) else 0
    print(f"dry run of {rb.name}: nothing will be run")
    titles = {"steps": "Steps", "on_failure": "On failure", "on_denied": "On denied",
              "on_success": "On success"}
    words = {"run": "would run", "skip": "would be skipped", "ask": "would ask for approval",
             "depends": "runs or is skipped depending on earlier steps", "error": "ERROR"}
    section = ""
    for p in planned:
        if p.section != section:
            section = p.section
            print(f"\n{titles[section]}")
        # Steps inside a step are indented under it, with where they are.
        pad = "  " * (p.within.count("/") + p.within.count("→") + 1)
        where = f"[{output.safe(p.within)}] " if p.within else ""
        print(f"{pad}{where}{p.step.id}: {words[p.verdict]}"
              + (f" ({output.safe(p.note)})" if p.note else ""))
        if p.step.targets:
            print(f"{pad}    on hosts: {_hosts_line(p.step)}")
        if p.step.kind == "parallel":
            continue
        label = {"confirm": "confirm:", "emit": "emit:", "uses": "uses:"}.get(p.step.kind, "$")
        command = p.command.removeprefix("emit ").removeprefix("uses ")
        for i, line in enumerate(output.safe(command).splitlines() or [""]):
            print(f"{pad}    {label if i == 0 else ' ' * len(label)} {line}")
    if rb.notify:
        from opsrun.commands.show import notify_line

        print("\nNotify (nothing is sent in a dry run)")
        for t in rb.notify:
            print(f"  {output.safe(notify_line(t))}")
    return 2 if any(p.verdict == "error" for p in planned) else 0


def _hosts_line(step: Step) -> str:
    """The hosts a step reaches, groups expanded: `web-1, web-2 (group:web; 10 at once)`."""
    names = ", ".join(h.name for h in step.targets)
    notes = [n for n in step.hosts if n.startswith("group:")]
    if len(step.targets) > 1:
        notes.append(f"{min(step.parallel, len(step.targets))} at once")
    return names + (f" ({'; '.join(notes)})" if notes else "")
