"""The process exit codes of DESIGN section 7, in one place."""
from __future__ import annotations

from typing import NewType

ExitCode = NewType("ExitCode", int)

OK = ExitCode(0)
RUN_FAILED = ExitCode(1)
USAGE = ExitCode(2)
DENIED = ExitCode(3)
INTERRUPTED = ExitCode(130)
