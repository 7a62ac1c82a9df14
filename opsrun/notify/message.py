"""What a notification says: one JSON message, its plain text, and its Slack-shaped body.

Messages are made when the transition happens, from values the engine already masked
(questions, commands, output tails); the text is masked once more when it is queued.
The JSON message is versioned (`version`), like opsrun's other machine output.
"""
from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from opsrun.durations import format_duration

VERSION = 1
OUTPUT_LINES = 20  # of each stream, in failure messages
OUTPUT_CHARS = 2500  # Slack refuses a section text over 3000 characters


def _common(event: str, run_id: str, runbook: str, subject: str) -> dict[str, Any]:
    return {"version": VERSION, "event": event, "run_id": run_id, "runbook": runbook,
            "host": socket.gethostname(),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "subject": subject}


def waiting(run_id: str, runbook: str, step_id: str, question: str,
            commands: Sequence[str], approvers: str, timeout_s: float | None,
            on_timeout: str, *, stale_after_s: float | None = None) -> dict[str, Any]:
    """A run waits for an answer (`stale_after_s`: and has waited that long already)."""
    asked = datetime.now(timezone.utc)
    deadline = None if timeout_s is None else \
        datetime.fromtimestamp(asked.timestamp() + timeout_s, timezone.utc)
    event = "waiting" if stale_after_s is None else "stale"
    subject = (f"{runbook}: run {run_id} waits for an answer" if stale_after_s is None else
               f"{runbook}: run {run_id} has waited {format_duration(stale_after_s)} for an "
               "answer")
    msg = {**_common(event, run_id, runbook, subject), "step": step_id, "question": question,
           "commands": list(commands), "approvers": approvers,
           "approve": f"opsrun approve {run_id}", "deny": f"opsrun deny {run_id}",
           "asked_at": asked.isoformat(timespec="seconds"),
           "deadline": None if deadline is None else deadline.isoformat(timespec="seconds"),
           "on_timeout": on_timeout if timeout_s is not None else None}
    if stale_after_s is not None:
        msg["waited_s"] = stale_after_s
    lines = [subject, "", f"Question (step {step_id}): {question}"]
    if commands:
        lines.append("If approved, it runs:")
        lines += [f"  $ {c}" for c in commands]
    lines.append(f"Who may answer: {approvers}")
    lines.append(f"Approve:  {msg['approve']}")
    lines.append(f"Deny:     {msg['deny']}")
    if deadline is not None:
        verdict = "approved" if on_timeout == "approve" else "denied"
        lines.append(f"Without an answer by {msg['deadline']} it is {verdict}.")
    msg["text"] = "\n".join(lines)
    return msg


def ended(event: str, run_id: str, runbook: str, step_id: str | None,
          exit_code: int | None, error: str | None, stdout: str, stderr: str
          ) -> dict[str, Any]:
    """A run failed or timed out waiting for an answer."""
    what = "failed" if event == "failed" else "timed out"
    subject = f"{runbook}: run {run_id} {what}" + (f" at step {step_id}" if step_id else "")
    output = _output(stdout, stderr)
    msg = {**_common(event, run_id, runbook, subject), "step": step_id,
           "exit_code": exit_code, "error": error, "output": output,
           "logs": f"opsrun logs {run_id}"}
    lines = [subject, ""]
    if error:
        lines.append(f"Error: {error}")
    if exit_code is not None:
        lines.append(f"Exit code: {exit_code}")
    if output:
        lines += ["Last output:", *[f"  {line}" for line in output.splitlines()]]
    lines.append(f"Logs: {msg['logs']}")
    msg["text"] = "\n".join(lines)
    return msg


def _output(stdout: str, stderr: str) -> str:
    parts = []
    for name, text in (("stdout", stdout), ("stderr", stderr)):
        lines = text.rstrip("\n").splitlines()[-OUTPUT_LINES:]
        if lines:
            parts.append(f"[{name}]\n" + "\n".join(lines))
    out = "\n".join(parts)
    return out if len(out) <= OUTPUT_CHARS else "…" + out[-OUTPUT_CHARS:]


def _esc(value: Any) -> str:
    """Slack's mrkdwn escapes: event data must not turn into <!channel> pings or links."""
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_body(msg: Mapping[str, Any]) -> dict[str, Any]:
    """A Slack-compatible body (incoming webhooks, and Mattermost's): `text` and `blocks`."""
    e = _esc
    fields: list[str] = []
    if msg["event"] in ("waiting", "stale"):
        fields.append(f"*Question* (step `{e(msg['step'])}`): {e(msg['question'])}")
        if msg.get("commands"):
            fields.append("*If approved, it runs:*\n```"
                          + e("\n".join(msg["commands"]))[:2000] + "```")
        fields.append(f"*Who may answer:* {e(msg['approvers'])}")
        fields.append(f"*Answer with:*\n```{e(msg['approve'])}\n{e(msg['deny'])}```")
        if msg.get("deadline"):
            fields.append(f"*Deadline:* {e(msg['deadline'])} (then {e(msg['on_timeout'])})")
    else:
        if msg.get("error"):
            fields.append(f"*Error:* {e(msg['error'])}")
        if msg.get("exit_code") is not None:
            fields.append(f"*Exit code:* {e(msg['exit_code'])}")
        if msg.get("output"):
            fields.append(f"*Last output:*\n```{e(msg['output'])}```")
        fields.append(f"*Logs:* `{e(msg['logs'])}`")
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": msg["subject"][:150]}}]
    blocks += [{"type": "section", "text": {"type": "mrkdwn", "text": f[:3000]}}
               for f in fields]
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": (
        f"opsrun on {e(msg['host'])} · runbook `{e(msg['runbook'])}` · run "
        f"`{e(msg['run_id'])}`")}]})
    return {"text": e(msg["text"]), "blocks": blocks}


def environment(msg: Mapping[str, Any]) -> dict[str, str]:
    """The OPSRUN_NOTIFY_* variables a command target gets (top-level scalars, and JSON)."""
    import json

    env = {"OPSRUN_NOTIFY_JSON": json.dumps(msg, ensure_ascii=False)}
    for key, value in msg.items():
        if key == "text":
            continue
        if isinstance(value, (list, tuple)):
            value = "\n".join(str(v) for v in value)
        if value is None:
            value = ""
        env[f"OPSRUN_NOTIFY_{key.upper()}"] = str(value)
    return env
