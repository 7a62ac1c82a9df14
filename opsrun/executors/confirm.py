"""Confirm steps: ask at the terminal now, answer from --yes, or wait for an answer given elsewhere."""
from __future__ import annotations

import os
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from opsrun import run_types as rt
from opsrun.approvals import (
    Waiter,
    describe_approvers,
    give_answer,
    refusal,
)
from opsrun.audit.format import RunbookRef
from opsrun.identity import Identity
from opsrun.terminal_text import safe


class FlagConfirmer:
    """`--yes`: every confirmation of this run is answered yes, by whoever gave the flag.

    Only where that person may answer: the commands refuse the run beforehand
    (approvals.check_flag_may_answer); a step the flag still may not answer (a runbook
    version that changed meanwhile) waits for an answer given elsewhere.
    """

    def __init__(self, who: Identity, fallback: WaitingConfirmer,
                 on_refused: Callable[[rt.ConfirmRequest, str], None] = lambda r, why: None
                 ) -> None:
        self.who = who
        self.fallback = fallback
        self.on_refused = on_refused

    def already_asked(self, run_id: str, step_id: str) -> bool:
        return self.fallback.already_asked(run_id, step_id)

    def confirm(self, request: rt.ConfirmRequest, cancel: threading.Event) -> rt.Answer:
        why = refusal(request.approvers.as_record(), self.who, request.starter.user)
        if why:
            self.on_refused(request, why)
            return self.fallback.confirm(request, cancel)
        return rt.Answer(True, self.who.user, self.who.uid, "flag",
                         comment=f"--yes given by {self.who.user}")


class WaitingConfirmer:
    """Record the question and wait for `opsrun approve/deny` (or park the run: the daemon)."""

    def __init__(self, waiter: Waiter, *, park: bool = False,
                 runbook_ref: Callable[[str], RunbookRef | None] = lambda rid: None,
                 socket_dir: Path | None = None,
                 on_waiting: Callable[[str, str], None] = lambda run_id, step_id: None
                 ) -> None:
        self.waiter = waiter
        self.park = park
        self.runbook_ref = runbook_ref
        self.socket_dir = socket_dir  # where to serve answers from other users
        # Told (run id, step id) when a run starts to wait here: for its notifications.
        self.on_waiting = on_waiting

    def already_asked(self, run_id: str, step_id: str) -> bool:
        """Whether this step of this run has its question recorded (a resumed run)."""
        return self.waiter.store.latest_approval(run_id, step_id) is not None

    def confirm(self, request: rt.ConfirmRequest, cancel: threading.Event) -> rt.Answer:
        store = self.waiter.store
        q = self.waiter.ask(request.run_id, request.step_id, request.question,
                            request.approvers, request.starter.user, request.timeout_s)
        if q.answer is None:
            store.update_run(request.run_id, state=rt.WAITING)
            self.on_waiting(request.run_id, request.step_id)
            if self.park:
                raise rt.RunParked(request.step_id)
            self.waiter.notify(waiting_message(request, q.deadline is not None))
            with self._serving(request.run_id):
                answered = self.waiter.wait(q, request.on_timeout, cancel,
                                            self.runbook_ref(request.run_id))
            if answered is None:
                if rt.cancel_reason(cancel) == rt.CANCELLED:
                    # Closed before the run records its end: no answer can land after it.
                    store.close_questions(request.run_id)
                store.update_run(request.run_id, state=rt.RUNNING)
                return rt.Answer(False, request.starter.user, request.starter.uid, "cancel")
            q = answered
            store.update_run(request.run_id, state=rt.RUNNING)
        return rt.Answer(q.answer == "approved", q.answered_by or "?", q.answered_uid,
                         q.how or "command", q.comment, recorded=True)

    @contextmanager
    def _serving(self, run_id: str) -> Iterator[None]:
        """While waiting, take answers over `runs/<id>.sock` (identity from SO_PEERCRED)."""
        if self.socket_dir is None:
            yield
            return
        from opsrun import control_socket

        def handle(req: dict[str, Any], who: Identity) -> dict[str, Any]:
            if req.get("op") not in ("approve", "deny") or req.get("run_id") != run_id:
                return {"ok": False, "message": f"this socket answers run {run_id} only",
                        "exit_code": 2}
            approve = req["op"] == "approve"
            comment = req.get("comment") if isinstance(req.get("comment"), str) else None
            step = req.get("step_id") if isinstance(req.get("step_id"), str) else None
            q = give_answer(self.waiter.store, self.waiter.audit, run_id, approve=approve,
                            who=who, comment=comment, step_id=step)
            verdict = "approved" if approve else "denied"
            return {"ok": True, "exit_code": 0,
                    "message": f"run {run_id}: step {q.step_id!r} {verdict} by {who.user}"}

        server = control_socket.Server(self.socket_dir / f"{run_id}.sock", handle)
        try:
            server.start()
        except OSError:
            yield  # answers still work through the store for whoever can write it
            return
        try:
            yield
        finally:
            server.stop()


def waiting_message(request: rt.ConfirmRequest, has_deadline: bool) -> str:
    lines = [f"run {request.run_id} is waiting for an answer to step {request.step_id!r}:",
             f"  {safe(request.question)}"]
    for command in request.guarded:
        lines.append(f"  then: {safe(command, keep_newlines=False)}")
    lines.append(f"  who may answer: {describe_approvers(request.approvers.as_record())}")
    lines.append(f"  answer with:  opsrun approve {request.run_id} --step {request.step_id} "
                 "[--comment TEXT]")
    lines.append(f"           or:  opsrun deny {request.run_id} --step {request.step_id} "
                 "[--comment TEXT]")
    if request.timeout_s is not None and has_deadline:
        from opsrun.durations import format_duration

        verdict = "approved" if request.on_timeout == "approve" else "denied"
        lines.append(f"  without an answer in {format_duration(request.timeout_s)} it is "
                     f"{verdict}")
    return "\n".join(lines)


class PromptConfirmer:
    """Ask `[y/N]` at the terminal; anything but yes is a denial, and so is end of input."""

    def __init__(self, who: Identity, fallback: WaitingConfirmer, *,
                 stdin: IO[str] | None = None, out: IO[str] | None = None,
                 on_refused: Callable[[rt.ConfirmRequest, str], None] = lambda r, why: None
                 ) -> None:
        self.who = who
        self.fallback = fallback
        self.stdin = stdin or sys.stdin
        self.out = out or sys.stdout
        self.on_refused = on_refused

    def already_asked(self, run_id: str, step_id: str) -> bool:
        return self.fallback.already_asked(run_id, step_id)

    def confirm(self, request: rt.ConfirmRequest, cancel: threading.Event) -> rt.Answer:
        why = refusal(request.approvers.as_record(), self.who, request.starter.user)
        if why:
            self._say(f"you cannot answer this question: {why}")
            self.on_refused(request, why)
            return self.fallback.confirm(request, cancel)
        self._say(f"\n{safe(request.question)}")
        if request.guarded:
            self._say("This will run:")
            for command in request.guarded:
                for i, line in enumerate(safe(command).splitlines() or [""]):
                    self._say(("  $ " if i == 0 else "    ") + line)
        if request.timeout_s is not None:
            from opsrun.durations import format_duration

            verdict = "yes" if request.on_timeout == "approve" else "no"
            self._say(f"(no answer in {format_duration(request.timeout_s)} counts as {verdict})")
        self.out.write("Proceed? [y/N] ")
        self.out.flush()
        line = _read_line(self.stdin, request.timeout_s, cancel)
        if line is _TIMEOUT:
            self._say("")
            return rt.Answer(request.on_timeout == "approve", "(timeout)", None, "timeout")
        if line is _CANCELLED:
            return rt.Answer(False, self.who.user, self.who.uid, "cancel")
        approved = isinstance(line, str) and line.strip().lower() in ("y", "yes")
        if line is None:
            self._say("")  # end of input: the cursor is still after the prompt
        return rt.Answer(approved, self.who.user, self.who.uid, "prompt")

    def _say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


_TIMEOUT = object()
_CANCELLED = object()


def _read_line(stream: IO[str], timeout_s: float | None, cancel: threading.Event) -> Any:
    """A line from a terminal, None at end of input, or _TIMEOUT / _CANCELLED."""
    fd = stream.fileno()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    buf = b""
    while True:
        if cancel.is_set():
            return _CANCELLED
        wait = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
        if wait <= 0:
            return _TIMEOUT
        ready, _, _ = select.select([fd], [], [], wait)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return buf.decode("utf-8", "replace") if buf else None
        buf += chunk
        if b"\n" in buf:
            return buf.split(b"\n", 1)[0].decode("utf-8", "replace")
