"""The one error hierarchy: every expected failure is an OpsrunError with an exit code."""
from __future__ import annotations

from typing import NamedTuple

from opsrun import exit_codes
from opsrun.exit_codes import ExitCode


class OpsrunError(Exception):
    """An expected failure: shown to the user as one clear message, never a traceback."""

    exit_code: ExitCode = exit_codes.RUN_FAILED


class UsageError(OpsrunError):
    """The command line or its input was wrong."""

    exit_code = exit_codes.USAGE


class Problem(NamedTuple):
    """One thing wrong in a file, at a position a person can jump to."""

    file: str
    line: int  # 1-based; 0 when the whole file is meant
    col: int  # 1-based; 0 when the whole file is meant
    message: str
    severity: str = "error"  # or "warning": reported, but the runbook still loads

    def __str__(self) -> str:
        if self.line:
            return f"{self.file}:{self.line}:{self.col}: {self.severity}: {self.message}"
        return f"{self.file}: {self.severity}: {self.message}"


class RunbookInvalid(OpsrunError):
    """One or more runbooks did not validate; carries every problem found."""

    exit_code = exit_codes.USAGE

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class ExpressionError(OpsrunError):
    """A `${{ }}` expression could not be evaluated at run time."""

    exit_code = exit_codes.RUN_FAILED


class StateError(OpsrunError):
    """The state folder, state store or audit log cannot be used."""

    exit_code = exit_codes.RUN_FAILED


class AuditWriteError(StateError):
    """An audit record could not be made durable; the action it records must not start."""
