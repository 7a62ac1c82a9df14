"""opsrun pending / approve / deny: answer runs that wait for a person, from any terminal."""
from __future__ import annotations

import sys
from pathlib import Path

from opsrun import control_socket, identity, output, paths
from opsrun.approvals import describe_approvers, give_answer, pending_rows
from opsrun.commands.runs import _store
from opsrun.durations import format_duration
from opsrun.errors import OpsrunError, UsageError
from opsrun.runs.context import open_run_context


def _sockets_for(folder: Path, run_ref: str) -> list[Path]:
    """Sockets of processes waiting on runs whose id is or starts with `run_ref`."""
    runs = folder / "runs"
    if not run_ref or "/" in run_ref or run_ref.startswith("."):
        return []
    exact = runs / f"{run_ref}.sock"
    try:
        if exact.exists():
            return [exact]
        found = sorted(runs.glob(f"{run_ref.upper()}*.sock"))
    except OSError as e:
        raise UsageError(f"cannot look into {runs}: {e.strerror}; the state folder's "
                         "permissions do not let you in (ask its owner to share it with "
                         "your group)") from None
    return found if len(found) == 1 else []


def pending(state_dir: str | None, *, as_json: bool) -> int:
    """What waits for an answer: runbook, step, question, who may answer, time left."""
    folder = paths.state_dir_from_env(state_dir)
    try:
        with _store(state_dir) as store:
            rows = pending_rows(store)
    except (OpsrunError, PermissionError):
        # Not allowed to read the store: the service may tell us (its socket is shared).
        try:
            reply = control_socket.request(folder / paths.CONTROL_SOCKET, {"op": "pending"})
        except control_socket.ControlUnavailable:
            raise UsageError(f"cannot read the state store in {folder} and no service "
                             "answers on its socket") from None
        rows = list(reply.data.get("pending", []))
    if as_json:
        output.print_json({"version": 1, "pending": rows})
        return 0
    if not rows:
        print("nothing is waiting for an answer")
        return 0
    table = []
    for r in rows:
        secs = r["seconds_left"]
        left = "no deadline" if not isinstance(secs, (int, float)) else \
            ("expired" if secs <= 0 else format_duration(float(secs)))
        approvers = r["approvers"]
        table.append((str(r["run_id"]), str(r["runbook"]), str(r["step_id"]),
                      str(r["question"]), describe_approvers(
                          approvers if isinstance(approvers, (dict, list)) else []), left))
    output.print_table(["run", "runbook", "step", "question", "who may answer", "time left"],
                       table)
    return 0


def answer(state_dir: str | None, audit_log: str | None, run_ref: str, *, approve: bool,
           comment: str | None, step_id: str | None = None) -> int:
    """Approve or deny as the user running this command (taken from the OS).

    The answer goes to whoever waits for it — through its socket, where the kernel tells it
    who we are — or, when nobody waits, straight into the state store.
    """
    folder = paths.state_dir_from_env(state_dir)
    sockets = [folder / paths.CONTROL_SOCKET, *_sockets_for(folder, run_ref)]
    for sock in sockets:
        try:
            run_id = run_ref if sock.name == paths.CONTROL_SOCKET else sock.stem
            reply = control_socket.request(sock, {"op": "approve" if approve else "deny",
                                           "run_id": run_id, "comment": comment,
                                           "step_id": step_id})
        except control_socket.ControlUnavailable:
            continue
        if reply.ok:
            print(reply.message)
        else:
            print(f"opsrun: {reply.message}", file=sys.stderr)
        return reply.exit_code
    who = identity.current()
    with open_run_context(state_dir, audit_log, {}) as rc:
        q = give_answer(rc.store, rc.audit, run_ref, approve=approve, who=who, comment=comment,
                        step_id=step_id)
    verdict = "approved" if approve else "denied"
    print(f"run {q.run_id}: step {q.step_id!r} {verdict} by {who.user}")
    return 0
