"""Shell steps on this machine: `bash -c SCRIPT` (or `shell:`) through proc.run_streaming."""
from __future__ import annotations

import os
import shlex
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from opsrun import proc, secrets, step_outputs
from opsrun.executors.base import ExecRequest, ExecResult, OutputFn


def base_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """opsrun's own environment, minus secrets: a step gets a secret only by asking for it."""
    env = dict(os.environ if environ is None else environ)
    return {k: v for k, v in env.items() if not k.startswith(secrets.ENV_PREFIX)}


def kill_grace(environ: Mapping[str, str] | None = None) -> float:
    """Seconds between SIGTERM and SIGKILL: OPSRUN_KILL_GRACE (e.g. 2s), else 5 s."""
    text = (os.environ if environ is None else environ).get("OPSRUN_KILL_GRACE")
    if not text:
        return proc.DEFAULT_GRACE_S
    from opsrun.durations import DurationError, parse_duration
    from opsrun.errors import UsageError
    try:
        return parse_duration(text)
    except DurationError as e:
        raise UsageError(f"OPSRUN_KILL_GRACE: {e}") from None


def shell_argv(shell: str, script: str) -> list[str]:
    """`bash -c SCRIPT`, or the step's `shell:` words followed by -c SCRIPT."""
    words = shlex.split(shell) if shell.strip() else ["bash"]
    return [*words, "-c", script]


class LocalExecutor:
    """Runs `run:` steps as local processes."""

    def __init__(self, grace_s: float | None = None,
                 environ: Mapping[str, str] | None = None,
                 extra_env: Mapping[str, str] | None = None,
                 on_start: Callable[[str, int], None] | None = None) -> None:
        self.grace_s = kill_grace() if grace_s is None else grace_s
        self.base_env = {**base_environment(environ), **(extra_env or {})}
        self.on_start = on_start  # (run id, pid of the step's process group leader)

    def execute(self, request: ExecRequest, on_output: OutputFn,
                cancel: threading.Event) -> ExecResult:
        out_file = Path(request.scratch_dir) / f"output-{request.step.id}-{request.attempt}"
        try:
            out_file.write_bytes(b"")
        except OSError as e:  # out of space or file descriptors: the step cannot start
            return ExecResult(None, error=f"cannot create {out_file} for $OPSRUN_OUTPUT: "
                                          f"{e.strerror}")
        env = {**self.base_env, **request.env, "OPSRUN_OUTPUT": str(out_file)}
        workdir = Path(os.path.expanduser(request.workdir)) if request.workdir else None
        result = proc.run_streaming(
            shell_argv(request.step.shell, request.script), env=env, cwd=workdir,
            on_output=lambda stream, data: on_output(stream, data, None),
            timeout_s=request.timeout_s, cancel=cancel, grace_s=self.grace_s,
            on_start=self._started(request.run_id))
        outputs, warnings = _read_outputs(out_file)
        return ExecResult(result.exit_code, result.timed_out, result.cancelled, result.error,
                          outputs, warnings)

    def _started(self, run_id: str) -> Callable[[int], None] | None:
        on_start = self.on_start
        return None if on_start is None else (lambda pid: on_start(run_id, pid))


def _read_outputs(path: Path) -> tuple[dict[str, str], list[str]]:
    try:
        size = path.stat().st_size
        if size > step_outputs.MAX_OUTPUT_FILE_BYTES:
            return {}, [f"$OPSRUN_OUTPUT is {size:,} bytes; only files up to "
                        f"{step_outputs.MAX_OUTPUT_FILE_BYTES:,} are read"]
        return step_outputs.parse(path.read_text("utf-8", "replace"))
    except OSError:
        return {}, []
    finally:
        path.unlink(missing_ok=True)
