"""opsrun show: a runbook as a readable plan."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from opsrun import describe, output
from opsrun.durations import format_duration
from opsrun.notify.targets import Target as NotifyTarget
from opsrun.runbook import Runbook, Step, find_runbook


def main(ref: str, folder: Path, *, as_json: bool = False) -> int:
    """Print the plan of one runbook, by name or path."""
    rb = find_runbook(ref, folder)
    if as_json:
        output.print_json(as_dict(rb))
    else:
        print(render(rb))
    return 0


def render(rb: Runbook) -> str:
    """The whole plan as text; the runbook's own text is escaped, headings are not."""
    return "\n".join(_with_headings(_plan_lines(rb)))


_HEADING = "\0heading\0"  # starts a heading line, whose heading part ends at a NUL


def _with_headings(lines: list[str]) -> list[str]:
    # Escaped first, decorated after: on a colour terminal a heading's own escape codes
    # must reach the terminal, while any in the runbook's text must not.
    out = []
    for line in lines:
        if line.startswith(_HEADING):
            head, _, tail = line[len(_HEADING):].partition("\0")
            out.append(output.heading(output.safe(head)) + output.safe(tail))
        else:
            out.append(output.safe(line))
    return out


def _plan_lines(rb: Runbook) -> list[str]:
    lines = [f"{_HEADING}{rb.name}\0  ({rb.path}, sha256 {rb.sha256[:12]})"]
    if rb.description:
        lines.append(f"  {rb.description.strip()}")
    lines += ["", _HEADING + "Triggers"]
    lines += [f"  {describe.trigger_long(t)}" for t in rb.triggers] or \
        ["  none: runs only by hand (opsrun run)"]
    if rb.params:
        lines += ["", _HEADING + "Params"]
        for p in rb.params.values():
            bits = [p.type]
            if p.default is not None:
                bits.append(f"default {json.dumps(p.default)}")
            if p.required:
                bits.append("required")
            if p.pattern:
                bits.append(f"pattern {p.pattern}")
            if p.choices:
                bits.append(f"choices {', '.join(p.choices)}")
            lines.append(f"  {p.name}  " + ", ".join(bits)
                         + (f"  — {p.description}" if p.description else ""))
    if rb.env:
        lines += ["", _HEADING + "Env"] + [f"  {k}={v}" for k, v in rb.env.items()]
    lines += ["", _HEADING + "Run"]
    lines.append(f"  concurrency: policy {rb.concurrency.policy}"
                 + (f", key {rb.concurrency.key}" if rb.concurrency.key else ", one key for all runs"))
    if rb.throttle is not None:
        lines.append(f"  throttle: {describe.throttle_text(rb.throttle)}")
    lines.append("  timeout: " + (format_duration(rb.timeout_s) if rb.timeout_s else "none"))
    for title, steps in (("Steps", rb.steps), ("On failure", rb.on_failure),
                         ("On denied", rb.on_denied), ("On success", rb.on_success)):
        if steps:
            lines += ["", _HEADING + title]
            for step in steps:
                lines += _step_lines(step)
    if rb.notify:
        lines += ["", _HEADING + "Notify"] + [f"  {notify_line(t)}" for t in rb.notify]
    if rb.outputs:
        lines += ["", _HEADING + "Outputs (for a caller's uses: step)"]
        lines += [f"  {name}: {value}" for name, value in rb.outputs.items()]
    return lines


def _step_lines(step: Step, indent: str = "  ") -> list[str]:
    head = f"{indent}{step.position + 1}. {step.title}"
    if step.explicit_id and step.title != step.id:
        head += f"  [{step.id}]"
    out = [head]
    pad = indent + "     "
    label, text = _body(step)
    if label:
        out.append(f"{pad}{label} {text[0]}")
        out += [f"{pad}{' ' * len(label)} {line}" for line in text[1:]]
    out += [f"{pad}{fact}" for fact in describe.step_facts(step)]
    for name, steps in step.branches:
        out.append(f"{pad}branch {name}:")
        for inner in steps:
            out += _step_lines(inner, pad + "  ")
    return out


def _body(step: Step) -> tuple[str, list[str]]:
    """What a step does, as a label and lines: `run: …`, `emit: {…}`, `uses: x with …`."""
    if step.kind == "parallel":
        return "", [""]
    if step.kind == "emit":
        return "emit:", [json.dumps(dict(step.emit or {}), ensure_ascii=False, default=str)]
    if step.kind == "uses":
        used = f" ({step.used.path})" if step.used is not None else ""
        inputs = ", ".join(f"{k}={v}" for k, v in step.inputs.items())
        return "uses:", [f"{step.uses}{used}" + (f" with {inputs}" if inputs else "")]
    body = step.run if step.kind == "run" else step.confirm
    text = (body or "").rstrip("\n").splitlines() or [""]
    return ("run:" if step.kind == "run" else "confirm:"), text


def notify_line(t: NotifyTarget) -> str:
    """A target as written: its secrets stay `${{ secrets.NAME }}`, never their values."""
    where = (f"webhook {t.url}" + (" (slack)" if t.format == "slack" else "")
             if t.kind == "webhook" else "command " + shlex.join(t.argv))
    stale = f"; stale after {format_duration(t.stale_after_s)}" if "stale" in t.events else ""
    return (f"{where} on {', '.join(t.events)}{stale}; {t.attempts} attempts, "
            f"{format_duration(t.timeout_s)} each")


def as_dict(rb: Runbook) -> dict[str, object]:
    """The runbook as JSON-ready data."""
    def step(s: Step) -> dict[str, object]:
        return {"id": s.id, "name": s.name, "kind": s.kind, "run": s.run, "confirm": s.confirm,
                "if": s.condition, "env": dict(s.env), "timeout_s": s.timeout_s,
                "retry": s.retry._asdict() | {"on": list(s.retry.on),
                                              "on_exit_codes": list(s.retry.on_exit_codes)},
                "continue_on_error": s.continue_on_error,
                "hosts": list(s.hosts), "parallel": s.parallel, "workdir": s.workdir,
                "shell": s.shell, "approvers": s.approvers.as_record(),
                "on_timeout": s.on_timeout, "emit": s.emit, "uses": s.uses,
                "uses_file": None if s.used is None else str(s.used.path),
                "with": dict(s.inputs),
                "for_each": list(s.for_each) if isinstance(s.for_each, tuple)
                else s.for_each, "max_parallel": s.max_parallel, "fail_fast": s.fail_fast,
                "branches": {name: [step(x) for x in steps] for name, steps in s.branches}}

    return {"version": 1, "name": rb.name, "file": str(rb.path), "sha256": rb.sha256,
            "description": rb.description,
            "triggers": [describe.trigger_short(t) for t in rb.triggers],
            "params": {n: p._asdict() | {"choices": list(p.choices)}
                       for n, p in rb.params.items()},
            "env": dict(rb.env),
            "concurrency": rb.concurrency._asdict(),
            "throttle": None if rb.throttle is None else rb.throttle._asdict(),
            "timeout_s": rb.timeout_s,
            "steps": [step(s) for s in rb.steps],
            "on_failure": [step(s) for s in rb.on_failure],
            "on_denied": [step(s) for s in rb.on_denied],
            "on_success": [step(s) for s in rb.on_success], "outputs": dict(rb.outputs),
            "notify": [t.as_record() for t in rb.notify]}
