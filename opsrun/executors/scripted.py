"""Executors and a confirmer that run nothing: a function decides what each step does.

For driving the engine in-process (tests, rehearsing a runbook), the way httpx's
MockTransport stands in for the network: the engine renders, decides, retries and reports
exactly as for real steps, and the handler sees every request it would have run.

    def handler(request: ExecRequest, cancel: threading.Event) -> Reply | int:
        return Reply(0, stdout="ok\\n") if request.step.id == "check" else 1

    engine = Engine({"run": ScriptedExecutor(handler), "ssh": ScriptedExecutor(handler)},
                    [listener], confirmer=ScriptedConfirmer(lambda q: True))
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from opsrun import run_types as rt
from opsrun.executors.base import ExecRequest, ExecResult, OutputFn


@dataclass(frozen=True)
class Reply:
    """What a scripted step did: its exit code, what it printed, the outputs it set."""

    exit_code: int | None = 0
    stdout: str = ""
    stderr: str = ""
    outputs: Mapping[str, str] = field(default_factory=dict)
    timed_out: bool = False
    error: str | None = None  # could not start (no shell, unreachable host)


Handler = Callable[[ExecRequest, threading.Event], "Reply | int"]


class ScriptedExecutor:
    """Answers each step with `handler(request, cancel)`; keeps every request it saw."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[ExecRequest] = []
        self._lock = threading.Lock()  # parallel runs call from several threads

    def execute(self, request: ExecRequest, on_output: OutputFn,
                cancel: threading.Event) -> ExecResult:
        with self._lock:
            self.requests.append(request)
        reply = self.handler(request, cancel)
        if isinstance(reply, int):
            reply = Reply(reply)
        for stream, text in (("stdout", reply.stdout), ("stderr", reply.stderr)):
            if text:
                on_output(stream, text.encode("utf-8", "surrogateescape"), None)
        return ExecResult(None if reply.error else reply.exit_code, reply.timed_out,
                          cancel.is_set(), reply.error, dict(reply.outputs))


class ScriptedConfirmer:
    """Answers each confirm step with `decide(request)`: True, False, or an Answer."""

    def __init__(self, decide: Callable[[rt.ConfirmRequest], bool | rt.Answer],
                 who: str = "tester") -> None:
        self.decide = decide
        self.who = who
        self.asked: list[rt.ConfirmRequest] = []

    def confirm(self, request: rt.ConfirmRequest, cancel: threading.Event) -> rt.Answer:
        self.asked.append(request)
        answer = self.decide(request)
        if isinstance(answer, rt.Answer):
            return answer
        return rt.Answer(answer, self.who, None, "command")
