"""What an executor is: something that runs one rendered step and reports how it went."""
from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

from opsrun.runbook import Step

_EMPTY_MAP: Mapping[str, Any] = MappingProxyType({})

# (stream "stdout"|"stderr", raw bytes, host name or None for local)
OutputFn = Callable[[str, bytes, "str | None"], None]


class ExecRequest(NamedTuple):
    """A step with every value rendered: what to run, where, with which variables."""

    step: Step
    run_id: str
    script: str  # values only referenced through variables (shell_words)
    display: str  # the same with values inline, for people
    env: Mapping[str, str]  # added to the executor's base environment
    workdir: str | None
    timeout_s: float | None
    scratch_dir: str  # a private folder of this run for files such as $OPSRUN_OUTPUT
    attempt: int = 1


class ExecResult(NamedTuple):
    exit_code: int | None
    timed_out: bool = False
    cancelled: bool = False
    error: str | None = None  # could not run at all (no shell, no workdir, unreachable)
    outputs: Mapping[str, str] = _EMPTY_MAP
    warnings: Sequence[str] = ()
    hosts: Mapping[str, Mapping[str, Any]] = _EMPTY_MAP  # fan-out steps

    @property
    def ok(self) -> bool:
        return self.error is None and self.exit_code == 0 and not self.timed_out \
            and not self.cancelled


class Executor(Protocol):
    """Runs one step; blocks until it ends; stops early when `cancel` is set."""

    def execute(self, request: ExecRequest, on_output: OutputFn,
                cancel: threading.Event) -> ExecResult: ...
