"""Plain data of runs: states, step outcomes, results, and what the engine reports."""
from __future__ import annotations

import threading
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

from opsrun import exit_codes

_EMPTY_MAP: Mapping[str, Any] = MappingProxyType({})

# Run states (DESIGN section 1).
QUEUED, RUNNING, WAITING = "queued", "running", "waiting"
SUCCEEDED, FAILED, DENIED, TIMED_OUT = "succeeded", "failed", "denied", "timed_out"
CANCELLED, INTERRUPTED = "cancelled", "interrupted"
FINAL_STATES = frozenset({SUCCEEDED, FAILED, DENIED, TIMED_OUT, CANCELLED})
ALL_STATES = (QUEUED, RUNNING, WAITING, SUCCEEDED, FAILED, DENIED, TIMED_OUT, CANCELLED,
              INTERRUPTED)


def state_phrase(state: str) -> str:
    """A run's state as the end of a sentence: `has ended (succeeded)`, `is waiting`."""
    return f"has ended ({state})" if state in FINAL_STATES else f"is {state}"


# Step outcomes (DESIGN section 2).
SUCCESS, FAILURE, SKIPPED = "success", "failure", "skipped"
STEP_DENIED, STEP_TIMED_OUT, STEP_CANCELLED = "denied", "timed_out", "cancelled"

EXIT_CODES = {
    SUCCEEDED: exit_codes.OK, FAILED: exit_codes.RUN_FAILED, DENIED: exit_codes.DENIED,
    TIMED_OUT: exit_codes.DENIED, CANCELLED: exit_codes.INTERRUPTED,
    INTERRUPTED: exit_codes.INTERRUPTED,
}


class Cancel(threading.Event):
    """A cancel signal that says why: `cancelled` (a person), or `interrupted` (shutdown)."""

    def __init__(self) -> None:
        super().__init__()
        self.reason = CANCELLED
        self.why: str | None = None
        self._linked: list[Cancel] = []
        self._link_lock = threading.RLock()  # a signal handler may cancel meanwhile

    def cancel(self, reason: str = CANCELLED, why: str | None = None) -> None:
        self.reason, self.why = reason, why
        self.set()

    def set(self) -> None:
        super().set()
        with self._link_lock:
            linked = list(self._linked)
        for child in linked:
            child.cancel(self.reason, self.why)

    def link(self, child: Cancel) -> None:
        """Cancel `child` too when this is cancelled (a run's branches and loop items)."""
        with self._link_lock:
            self._linked.append(child)
        if self.is_set():
            child.cancel(self.reason, self.why)

    def unlink(self, child: Cancel) -> None:
        with self._link_lock:
            if child in self._linked:
                self._linked.remove(child)


def cancel_reason(event: threading.Event) -> str:
    """The run state a cancelled run ends in."""
    reason: str = getattr(event, "reason", CANCELLED)
    return reason


def cancel_why(event: threading.Event) -> str | None:
    """Why the run was cancelled, when the canceller said."""
    why: str | None = getattr(event, "why", None)
    return why


class StepResult(NamedTuple):
    """What one step did; `steps.<id>` in expressions reads these fields."""

    id: str
    outcome: str
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    outputs: Mapping[str, str] = _EMPTY_MAP
    duration: float = 0.0
    attempts: int = 0
    hosts: Mapping[str, Mapping[str, Any]] = _EMPTY_MAP
    error: str | None = None
    answer: dict[str, Any] | None = None  # confirm steps: who answered what
    items: tuple[dict[str, Any], ...] | None = None  # for_each: each item's result
    branches: Mapping[str, Mapping[str, Any]] | None = None  # parallel: each branch's end

    def context(self) -> dict[str, Any]:
        """The value of `steps.<id>` for expressions."""
        out: dict[str, Any] = {"exit_code": self.exit_code, "stdout": self.stdout,
                               "stderr": self.stderr, "outcome": self.outcome,
                               "duration": round(self.duration, 3), "outputs": self.outputs,
                               "hosts": self.hosts}
        if self.answer is not None:
            out["answer"] = self.answer
        if self.items is not None:
            out["items"] = list(self.items)
        if self.branches is not None:
            out["branches"] = dict(self.branches)
        return out


class RunResult:
    """How a run went; the engine fills it in as the run goes."""

    def __init__(self, run_id: str, runbook: str, state: str,
                 steps: list[StepResult] | None = None) -> None:
        self.run_id = run_id
        self.runbook = runbook
        self.state = state
        self.steps: list[StepResult] = [] if steps is None else steps
        self.failed_step: str | None = None
        self.error: str | None = None
        self.duration = 0.0
        self.waiting_step: str | None = None

    @property
    def exit_code(self) -> int:
        return int(EXIT_CODES.get(self.state, exit_codes.RUN_FAILED))


class Listener(Protocol):
    """Receives the engine's transitions; the audit log, the state store and the terminal."""

    def transition(self, kind: str, data: dict[str, Any]) -> None: ...

    def output(self, step_id: str, stream: str, text: str, host: str | None) -> None: ...


class Emitter(Protocol):
    """Queues an event that an `emit:` step made, for the service to match (durably)."""

    def __call__(self, data: dict[str, Any], via: dict[str, Any]) -> None: ...


class ConfirmRequest(NamedTuple):
    """A question for a person, with what it guards."""

    run_id: str
    runbook: str
    step_id: str
    question: str
    guarded: tuple[str, ...]  # rendered commands of the steps up to the next confirm
    approvers: Any  # runbook.Approvers
    timeout_s: float | None
    on_timeout: str
    starter: Any  # identity.Identity of who started the run


class Answer(NamedTuple):
    """A person's answer (or the flag's, or the clock's)."""

    approved: bool
    user: str
    uid: int | None
    how: str  # prompt | command | flag | timeout | cancel
    comment: str | None = None
    recorded: bool = False  # already in the audit log (answered from another process)

    def as_record(self) -> dict[str, Any]:
        return {"approved": self.approved, "answered_by": self.user,
                "answered_uid": self.uid, "how": self.how, "comment": self.comment}


class RunParked(Exception):
    """The run waits for an answer that will come later (another terminal, the daemon)."""

    def __init__(self, step_id: str) -> None:
        super().__init__(step_id)
        self.step_id = step_id


class Confirmer(Protocol):
    """Gets an answer to a confirm step, or raises RunParked to wait for one elsewhere."""

    def confirm(self, request: ConfirmRequest, cancel: Any) -> Answer: ...
