"""The run engine: walks a runbook's steps for one event, the same for `run` and `watch`.

It evaluates `if:`, renders values, calls an executor, applies timeouts, retries and
failure handling, and reports every transition to its listeners in order. The first
listener is the audit log: a transition it cannot record raises, and the step it announces
does not start (fail closed). The engine knows nothing of terminals, files or databases.
"""
from __future__ import annotations

import codecs
import itertools
import json
import threading
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

from opsrun import expressions, flow, scratch, shell_words
from opsrun import run_types as rt
from opsrun.errors import ExpressionError, StateError
from opsrun.event import Event
from opsrun.ids import new_id
from opsrun.params import ParamError, resolve
from opsrun.executors.base import ExecRequest, ExecResult, Executor
from opsrun.identity import Identity
from opsrun.runbook import Runbook, Step
from opsrun.secrets import Masker, StreamMasker

_EMPTY_MAP: Mapping[str, Any] = MappingProxyType({})

OUTPUT_TAIL_CHARS = 64 * 1024
MAX_ENV_VALUE = 64 * 1024  # bigger event values reach steps through $OPSRUN_EVENT_FILE only
MAX_CHAIN_DEPTH = 8  # events emitted by runs that emitted events…: then the chain is cut
MAX_ITEMS = 10_000  # a for_each list longer than this is refused, not run


class RunRequest(NamedTuple):
    """One run of one runbook: for an event, with typed params, started by someone."""

    runbook: Runbook
    run_id: str
    event: Event
    params: Mapping[str, Any]
    starter: Identity
    trigger: str | None = None
    resume_at: int = 0  # index of the first main step to run (resume)
    resume_attempt: int = 1  # its first attempt: more when a retry was due (restart)
    retry_at: float | None = None  # when that retry is due (Unix time)
    prior: Mapping[str, rt.StepResult] = _EMPTY_MAP  # results before resume_at


class _MissingSecrets(dict[str, str]):
    def __missing__(self, key: str) -> str:
        raise ExpressionError(f"the secret {key!r} is not set; give it as "
                              f"OPSRUN_SECRET_{key}=… or in the secrets file")


class Engine:
    """Runs runbooks; one Engine serves many runs (and threads) at once."""

    def __init__(self, executors: Mapping[str, Executor], listeners: Sequence[rt.Listener],
                 *, secrets: Mapping[str, str] | None = None,
                 confirmer: rt.Confirmer | None = None,
                 emitter: rt.Emitter | None = None) -> None:
        self.executors = executors
        self.listeners = list(listeners)
        self.secrets = dict(secrets or {})
        self.masker = Masker(self.secrets)
        self.confirmer = confirmer
        self.emitter = emitter
        # Branches and loop items report from their own threads: one transition at a time
        # keeps the audit chain in the order things happened.
        self._lock = threading.RLock()

    # ── the run ─────────────────────────────────────────────────────────────

    def run(self, req: RunRequest, cancel: threading.Event | None = None) -> rt.RunResult:
        """Run to the end (or until parked); a failed step is a result, an unwritable record raises StateError."""
        return _Run(self, req, cancel or rt.Cancel()).go()

    def end_run(self, run_id: str) -> None:
        """Let executors free what they keep for a run (SSH connections), however it ended."""
        for executor in self.executors.values():
            end = getattr(executor, "end_run", None)
            if end is not None:
                end(run_id)

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        with self._lock:
            for listener in self.listeners:
                listener.transition(kind, data)

    def emit_unrecorded(self, kind: str, data: dict[str, Any]) -> None:
        """Best effort, after the record failed: listeners other than the audit log."""
        for listener in self.listeners:
            if getattr(listener, "is_audit", False):
                continue
            try:
                listener.transition(kind, data)
            except Exception:  # noqa: BLE001 - the original error is what matters
                pass

    def output(self, step_id: str, stream: str, text: str, host: str | None) -> None:
        with self._lock:
            for listener in self.listeners:
                listener.output(step_id, stream, text, host)

    def context(self, req: RunRequest, steps: dict[str, Any],
                failed_step: str | None = None) -> dict[str, Any]:
        """What expressions can read, before the runbook's env is rendered."""
        return {
            "event": dict(req.event.data),
            "params": dict(req.params),
            "env": {},
            "steps": steps,
            "run": {"id": req.run_id, "runbook": req.runbook.name,
                    "sha256": req.runbook.sha256, "started_by": req.starter.user,
                    "dry_run": False, "failed_step": failed_step},
            "secrets": _MissingSecrets(self.secrets),
        }


class _Run:
    """The state of one run while it goes."""

    def __init__(self, engine: Engine, req: RunRequest, cancel: threading.Event) -> None:
        self.e = engine
        self.req = req
        self.rb = req.runbook
        self.cancel = cancel
        self.results: list[rt.StepResult] = list(req.prior.values())
        self.steps_ctx: dict[str, Any] = {k: v.context() for k, v in req.prior.items()}
        self.ctx = engine.context(req, self.steps_ctx)
        self.started = time.monotonic()
        self.deadline = None if self.rb.timeout_s is None else self.started + self.rb.timeout_s
        try:
            self.scratch = scratch.make(req.run_id)
        except OSError as e:  # out of space or file descriptors: say so, run nothing
            raise StateError(f"cannot create a scratch folder for run {req.run_id}: "
                             f"{e.strerror or e} (out of disk space or file descriptors?); "
                             "nothing was run") from None
        self.ordinal = 0
        # Steps inside a step (branches, items, a used runbook's steps) run in forks of
        # this run: recorded under the top-level step's index, numbered by `sub`.
        self.forked = False
        self.top_index = 0
        self.extra: dict[str, Any] = {}
        self.prefix = ""  # a used runbook's step ids are recorded as `<uses step>.<id>`
        self.subs = itertools.count(1)

    def _fork(self, cancel: threading.Event, extra: Mapping[str, Any], *,
              rb: Runbook | None = None, ctx: dict[str, Any] | None = None,
              prefix: str = "") -> _Run:
        """A run of part of this run: the same request, scratch folder and deadline."""
        f = object.__new__(_Run)
        f.e, f.req, f.cancel = self.e, self.req, cancel
        f.rb = rb or self.rb
        f.results = []
        f.steps_ctx = {} if ctx is not None else dict(self.steps_ctx)
        f.ctx = dict(self.ctx if ctx is None else ctx)
        f.ctx["steps"] = f.steps_ctx
        f.started, f.deadline = self.started, self.deadline
        f.subs = self.subs
        # Parts that run side by side write their event and output files apart.
        try:
            f.scratch = scratch.make_part(self.scratch, next(self.subs))
        except OSError as e:
            raise StateError(f"cannot create a scratch folder in {self.scratch}: "
                             f"{e.strerror or e} (out of disk space?)") from None
        f.ordinal = f.top_index = self.top_index
        f.forked = True
        f.extra = {**self.extra, **extra}
        f.prefix = self.prefix + prefix
        return f

    def _adopt(self, fork: _Run, *, steps: bool = True) -> None:
        """Take a finished fork's results (and, but for a used runbook, its `steps.<id>`)."""
        self.results.extend(r._replace(id=fork.prefix[len(self.prefix):] + r.id)
                            for r in fork.results)
        if steps:
            self.steps_ctx.update(fork.steps_ctx)

    def go(self) -> rt.RunResult:
        try:
            return self._go()
        finally:
            self.e.end_run(self.req.run_id)

    def _go(self) -> rt.RunResult:
        result = rt.RunResult(self.req.run_id, self.rb.name, rt.RUNNING, self.results)
        try:
            self.e.emit("run.started", self._run_fields(
                event=dict(self.req.event.data), params=self.req.params,
                started_by=self.req.starter.as_record(), trigger=self.req.trigger,
                resume_at=self.req.resume_at or None))
            self._main(result)
        except rt.RunParked as parked:
            result.state, result.waiting_step = rt.WAITING, parked.step_id
        except StateError as err:
            # Nothing more can be recorded, so nothing more may run: tell whoever can still
            # hear it, and let the caller report the error.
            scratch.remove(self.scratch)
            self.e.emit_unrecorded("run.finished", self._run_fields(
                state=rt.FAILED, exit_code=rt.EXIT_CODES[rt.FAILED], failed_step=None,
                error=str(err), duration=round(time.monotonic() - self.started, 3)))
            raise
        result.duration = time.monotonic() - self.started
        scratch.remove(self.scratch)
        if result.state != rt.WAITING:
            self.e.emit("run.finished", self._run_fields(
                state=result.state, exit_code=result.exit_code, failed_step=result.failed_step,
                error=result.error, duration=round(result.duration, 3)))
        return result

    def _main(self, result: rt.RunResult) -> None:
        try:
            env = {k: expressions.render_text(v, self.ctx) for k, v in self.rb.env.items()}
        except ExpressionError as err:
            result.state, result.error = rt.FAILED, f"env: {err}"
            return
        self.ctx["env"] = env
        self.ordinal = self.req.resume_at
        state, failed = self._walk(self.rb.steps[self.req.resume_at:], cleanup=False)
        result.state = state
        if state in (rt.CANCELLED, rt.INTERRUPTED):
            result.failed_step = failed
            why = rt.cancel_why(self.cancel)
            result.error = f"{state} at step {failed!r}" + (f": {why}" if why else "")
        elif state == rt.FAILED:
            result.failed_step = failed
            result.error = result.error or self._error_of(failed)
            self.ctx["run"]["failed_step"] = failed
            self.ordinal = len(self.rb.steps)
            self._walk(self.rb.on_failure, cleanup=True)
        elif state in (rt.DENIED, rt.TIMED_OUT):
            result.failed_step = failed
            self.ctx["run"]["failed_step"] = failed
            self.ordinal = len(self.rb.steps) + len(self.rb.on_failure)
            self._walk(self.rb.on_denied, cleanup=True)
        elif state == rt.SUCCEEDED and self.rb.on_success:
            self.ordinal = len(self.rb.steps) + len(self.rb.on_failure) + len(self.rb.on_denied)
            self._walk(self.rb.on_success, cleanup=True)

    def _error_of(self, step_id: str | None) -> str | None:
        for r in self.results[::-1]:
            if r.id == step_id:
                if r.error:
                    return r.error
                if r.outcome == rt.STEP_TIMED_OUT:
                    return f"step {step_id!r} timed out"
                return f"step {step_id!r} exited with {r.exit_code}"
        return None

    def _walk(self, steps: Sequence[Step], *, cleanup: bool) -> tuple[str, str | None]:
        """Run steps in order; return the run state they lead to and the step at fault."""
        state, failed = rt.SUCCEEDED, None
        for step in steps:
            ordinal = self.ordinal
            if not self.forked:
                self.ordinal += 1
                self.top_index = ordinal
            if self.cancel.is_set():
                return rt.cancel_reason(self.cancel), step.id
            if self._run_timed_out() and not cleanup:
                return rt.FAILED, step.id
            if not self.forked:
                self.e.emit("run.progress", self._run_fields(current_step=ordinal))
            r = self._step(step, ordinal)
            self.results.append(r)
            self.steps_ctx[step.id] = r.context()
            if r.outcome == rt.STEP_CANCELLED:
                return rt.cancel_reason(self.cancel), step.id
            if cleanup:
                continue
            if r.outcome == rt.STEP_DENIED:
                timed_out = r.answer is not None and r.answer.get("how") == "timeout"
                return (rt.TIMED_OUT if timed_out else rt.DENIED), step.id
            if r.outcome in (rt.FAILURE, rt.STEP_TIMED_OUT) and not step.continue_on_error:
                return rt.FAILED, step.id
        return state, failed

    def _run_timed_out(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def _run_fields(self, **fields: Any) -> dict[str, Any]:
        return {"run_id": self.req.run_id, "runbook": self.rb, **fields}

    # ── one step ────────────────────────────────────────────────────────────

    def _step(self, step: Step, ordinal: int) -> rt.StepResult:
        base = self._step_fields(step, ordinal)
        if step.for_each is not None:  # `if:` is decided per item: it may read `item`
            return self._for_each(step, base)
        if step.condition is not None:
            try:
                go = step.condition if isinstance(step.condition, bool) else \
                    expressions.truthy(step.condition, self.ctx)
            except ExpressionError as err:
                return self._fail_before_start(step, base, f"if: {err}")
            if not go:
                self.e.emit("step.skipped", {**base, "condition": step.condition})
                return rt.StepResult(step.id, rt.SKIPPED)
        if step.kind == "confirm":
            return self._confirm(step, base)
        if step.kind == "emit":
            return self._emit_step(step, base)
        if step.kind == "uses":
            return self._uses(step, base)
        if step.kind == "parallel":
            return self._parallel(step, base)
        try:
            step_ctx = self._step_context(step)
            rendered = shell_words.render_with(step.plan, step_ctx) if step.plan is not None \
                else shell_words.RenderedScript(step.run or "", {}, step.run or "")
            workdir = expressions.render_text(step.workdir, step_ctx) if step.workdir else None
        except ExpressionError as err:
            return self._fail_before_start(step, base, str(err))
        try:
            event_env = self._event_env()
        except OSError as e:  # out of space or file descriptors: the step cannot start
            return self._fail_before_start(step, base, "cannot write the event file for the "
                                           f"step in {self.scratch}: {e.strerror}")
        env = {**step_ctx["env"], **event_env, **rendered.env,
               "OPSRUN_RUN_ID": self.req.run_id, "OPSRUN_RUNBOOK": self.rb.name,
               "OPSRUN_STEP_ID": step.id}
        return self._attempts(step, base, rendered, env, workdir)

    def _step_fields(self, step: Step, ordinal: int) -> dict[str, Any]:
        fields = self._run_fields(step_id=self.prefix + step.id, step_name=step.title,
                                  index=ordinal, step_kind=step.kind, step=step)
        if self.forked:
            fields.update(self.extra, sub=next(self.subs))
        return fields

    def _step_context(self, step: Step) -> dict[str, Any]:
        ctx = dict(self.ctx)
        env = dict(self.ctx["env"])
        for k, v in step.env.items():
            env[k] = expressions.render_text(v, self.ctx)
        ctx["env"] = env
        return ctx

    def _event_env(self) -> dict[str, str]:
        """OPSRUN_EVENT (the whole event) and OPSRUN_EVENT_<FIELD> for top-level scalars."""
        data = self.req.event.data
        text = self.req.event.to_json()
        path = f"{self.scratch}/event.json"
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        env = {"OPSRUN_EVENT_FILE": path}
        if len(text) <= MAX_ENV_VALUE and "\x00" not in text:
            env["OPSRUN_EVENT"] = text
        for key, value in data.items():
            if isinstance(value, (str, int, float, bool)) and not isinstance(value, dict):
                name = "OPSRUN_EVENT_" + "".join(c if c.isalnum() else "_"
                                                 for c in str(key)).upper()
                v = expressions.to_text(value)
                if len(v) <= MAX_ENV_VALUE and "\x00" not in v and name.isascii():
                    env[name] = v
        return env

    def _fail_before_start(self, step: Step, base: dict[str, Any], error: str
                           ) -> rt.StepResult:
        error = self.e.masker(error)  # an expression's error may quote a secret's value
        r = rt.StepResult(step.id, rt.FAILURE, error=error)
        self.e.emit("step.finished", {**base, "attempt": 1, "outcome": r.outcome,
                                      "exit_code": None, "duration": 0.0, "stdout": "",
                                      "stderr": "", "outputs": {}, "hosts": {}, "error": error})
        return r

    def _attempts(self, step: Step, base: dict[str, Any], rendered: shell_words.RenderedScript,
                  env: dict[str, str], workdir: str | None) -> rt.StepResult:
        executor = self.e.executors["ssh" if step.hosts else "run"]
        shown = self.e.masker(rendered.display)  # listeners are told no secret
        started = time.monotonic()
        result = rt.StepResult(step.id, rt.FAILURE)
        first = 1
        if base["index"] == self.req.resume_at and self.req.resume_attempt > 1 \
                and not self.forked:
            # A retry that was due when the service stopped: its wait goes on from there.
            first = self.req.resume_attempt
            if self._sleep(max(0.0, (self.req.retry_at or 0.0) - time.time())):
                return rt.StepResult(step.id, rt.STEP_CANCELLED)
        for attempt in range(first, step.retry.attempts + 1):
            timeout = self._timeout_for(step)
            self.e.emit("step.started", {**base, "attempt": attempt,
                                         "attempts": step.retry.attempts,
                                         "command": shown,
                                         "hosts": [h.name for h in step.targets]
                                         or list(step.hosts),
                                         "workdir": workdir, "timeout_s": timeout})
            capture = _Capture(self.e, step.id)
            request = ExecRequest(step, self.req.run_id, rendered.script, rendered.display, env,
                                  workdir, timeout, self.scratch, attempt)
            t0 = time.monotonic()
            x = executor.execute(request, capture.feed, self.cancel)
            capture.close()
            result = self._result(step, x, capture, attempt, time.monotonic() - started)
            # An SSH step's record says per host what ran where: the command goes with it.
            ssh_fields = {"command": shown} if step.hosts else {}
            self.e.emit("step.finished", {**base, **ssh_fields, "attempt": attempt,
                                          "outcome": result.outcome,
                                          "exit_code": x.exit_code,
                                          "duration": round(time.monotonic() - t0, 3),
                                          "stdout": result.stdout, "stderr": result.stderr,
                                          "outputs": result.outputs, "hosts": result.hosts,
                                          "error": result.error, "warnings": x.warnings})
            if not self._try_again(step, base, result, x.exit_code, attempt):
                break
        return result

    def _try_again(self, step: Step, base: dict[str, Any], result: rt.StepResult,
                   exit_code: int | None, attempt: int) -> bool:
        """Whether to make another attempt: retries left for this outcome, the wait
        recorded (`step.retrying`) and waited out without the run being cancelled."""
        if result.outcome in (rt.SUCCESS, rt.STEP_CANCELLED) or \
                attempt == step.retry.attempts or \
                not step.retry.retries(result.outcome, exit_code) or self._run_timed_out():
            return False
        wait = step.retry.wait_before(attempt + 1)
        self.e.emit("step.retrying", {**base, "attempt": attempt + 1,
                                      "attempts": step.retry.attempts,
                                      "delay_s": round(wait, 3),
                                      "at": round(time.time() + wait, 3)})
        return not self._sleep(wait)

    # ── emit, uses, parallel and for_each steps ─────────────────────────────

    def _finished(self, base: dict[str, Any], r: rt.StepResult, attempt: int, t0: float,
                  **extra: Any) -> None:
        self.e.emit("step.finished", {**base, "attempt": attempt, "outcome": r.outcome,
                                      "exit_code": r.exit_code,
                                      "duration": round(time.monotonic() - t0, 3),
                                      "stdout": r.stdout, "stderr": r.stderr,
                                      "outputs": r.outputs, "hosts": {}, "error": r.error,
                                      **extra})

    def _emit_step(self, step: Step, base: dict[str, Any]) -> rt.StepResult:
        try:
            data = expressions.render_value(dict(step.emit or {}), self._step_context(step))
        except ExpressionError as err:
            return self._fail_before_start(step, base, f"emit: {err}")
        depth = chain_depth(self.req.event.data)
        if depth >= MAX_CHAIN_DEPTH:
            return self._fail_before_start(step, base, (
                f"emit: refused: this run's event came down a chain of {depth} runs that "
                f"emitted events (the most opsrun allows is {MAX_CHAIN_DEPTH}); runbooks "
                "that trigger each other would never stop — see `emitted_by` in the event"))
        if not isinstance(data.get("id"), (str, int)) or data.get("id") == "":
            data["id"] = new_id()
        data["emitted_by"] = {"run_id": self.req.run_id, "runbook": self.rb.name,
                              "step_id": self.prefix + step.id, "depth": depth + 1}
        shown = self.e.masker(json.dumps(data, ensure_ascii=False, default=str))
        t0 = time.monotonic()
        self.e.emit("step.started", {**base, "attempt": 1, "attempts": 1, "command": shown})
        error = None
        if self.e.emitter is None:
            error = "emit: there is no event queue here"
        else:
            try:
                self.e.emitter(data, {"via": "emit step", "run_id": self.req.run_id,
                                      "step_id": self.prefix + step.id})
            except (StateError, OSError, ValueError, TypeError) as e:
                error = self.e.masker(f"emit: the event could not be queued: {e}")
        outputs = {} if error else {"event_id": str(data["id"])}
        r = rt.StepResult(step.id, rt.FAILURE if error else rt.SUCCESS, outputs=outputs,
                          duration=time.monotonic() - t0, attempts=1, error=error)
        self._finished(base, r, 1, t0)
        return r

    def _uses(self, step: Step, base: dict[str, Any]) -> rt.StepResult:
        child = step.used
        if child is None:
            return self._fail_before_start(step, base, f"uses: {step.uses!r} was not loaded")
        try:
            given = expressions.render_value(dict(step.inputs), self._step_context(step))
            typed = resolve(child.params, given)
        except (ExpressionError, ParamError) as err:
            return self._fail_before_start(step, base, self.e.masker(f"with: {err}"))
        child_run = f"{self.req.run_id}/{self.prefix}{step.id}"
        shown_inputs = json.loads(self.e.masker(json.dumps(typed, default=str)))
        result = rt.StepResult(step.id, rt.FAILURE)
        for attempt in range(1, step.retry.attempts + 1):
            t0 = time.monotonic()
            self.e.emit("step.started", {**base, "attempt": attempt,
                                         "attempts": step.retry.attempts,
                                         "command": f"uses {step.uses}",
                                         "child_run": child_run, "inputs": shown_inputs})
            result = self._child_run(step, child, typed, child_run, attempt, t0)
            self._finished(base, result, attempt, t0, child_run=child_run)
            if not self._try_again(step, base, result, None, attempt):
                break
        return result

    def _child_run(self, step: Step, child: Runbook, typed: Mapping[str, Any],
                   child_run: str, attempt: int, t0: float) -> rt.StepResult:
        ctx = {"event": self.ctx["event"], "params": dict(typed), "env": {},
               "run": {**self.ctx["run"], "runbook": child.name, "sha256": child.sha256,
                       "failed_step": None},
               "secrets": self.ctx["secrets"]}
        f = self._fork(self.cancel, {"parent_step": self.prefix + step.id,
                                     "child_run": child_run},
                       rb=child, ctx=ctx, prefix=f"{step.id}.")
        f.e.emit("run.child_started", f._run_fields(
            child_run=child_run, parent_step=self.prefix + step.id, attempt=attempt,
            params=json.loads(self.e.masker(json.dumps(dict(typed), default=str)))))
        state, failed, error, outputs = f._body()
        self._adopt(f, steps=False)
        self.e.emit("run.child_finished", f._run_fields(
            child_run=child_run, parent_step=self.prefix + step.id, attempt=attempt,
            state=state, failed_step=failed, error=error, outputs=outputs,
            duration=round(time.monotonic() - t0, 3)))
        if state == rt.SUCCEEDED:
            outcome = rt.SUCCESS
        elif state in (rt.CANCELLED, rt.INTERRUPTED):
            outcome = rt.STEP_CANCELLED
        else:
            outcome = rt.FAILURE
        if error is not None:
            error = f"{step.uses} failed" + (f" at step {failed!r}" if failed else "") + \
                f": {error}"
        return rt.StepResult(step.id, outcome, outputs=outputs, error=error, attempts=attempt,
                             duration=time.monotonic() - t0)

    def _body(self) -> tuple[str, str | None, str | None, dict[str, str]]:
        """A used runbook inside its caller: env, steps, on_failure or on_success, outputs."""
        try:
            self.ctx["env"] = {k: expressions.render_text(v, self.ctx)
                               for k, v in self.rb.env.items()}
        except ExpressionError as err:
            return rt.FAILED, None, self.e.masker(f"env: {err}"), {}
        state, failed = self._walk(self.rb.steps, cleanup=False)
        if state == rt.FAILED:
            self.ctx["run"]["failed_step"] = failed
            error = self._error_of(failed)
            self._walk(self.rb.on_failure, cleanup=True)
            return state, failed, error, {}
        if state != rt.SUCCEEDED:
            return state, failed, f"{state} at step {failed!r}", {}
        self._walk(self.rb.on_success, cleanup=True)
        try:
            outputs = {k: self.e.masker(expressions.render_text(v, self.ctx))
                       for k, v in self.rb.outputs.items()}
        except ExpressionError as err:
            return rt.FAILED, None, self.e.masker(f"outputs: {err}"), {}
        return state, None, None, outputs

    def _parallel(self, step: Step, base: dict[str, Any]) -> rt.StepResult:
        names = [name for name, _steps in step.branches]
        t0 = time.monotonic()
        self.e.emit("step.started", {**base, "attempt": 1, "attempts": 1, "branches": names,
                                     "fail_fast": step.fail_fast})
        forks: dict[int, _Run] = {}
        ends: dict[int, tuple[str, str | None]] = {}

        def branch(i: int) -> flow.Unit:
            def go(stop: rt.Cancel) -> bool:
                f = forks[i] = self._fork(stop, {"parent_step": self.prefix + step.id,
                                                 "branch": names[i]})
                ends[i] = f._walk(step.branches[i][1], cleanup=False)
                return ends[i][0] == rt.SUCCEEDED
            return go

        oks = flow.run_all([branch(i) for i in range(len(names))], limit=len(names),
                           fail_fast=step.fail_fast, cancel=self.cancel,
                           why_failed=lambda i: f"branch {names[i]!r} failed")
        for i in sorted(forks):
            self._adopt(forks[i])
        summary: dict[str, dict[str, Any]] = {}
        error = None
        for i, (name, ok) in enumerate(zip(names, oks)):
            state, failed = ends.get(i, (rt.CANCELLED, None))
            summary[name] = {"outcome": _OUTCOME_OF_STATE.get(state, rt.FAILURE),
                             "failed_step": failed, "started": i in ends}
            if ok is False and error is None and i in forks and \
                    summary[name]["outcome"] == rt.FAILURE:
                why = forks[i]._error_of(failed) or "failed"
                error = f"branch {name!r} failed at step {failed!r}: {why}"
        r = rt.StepResult(step.id, self._group_outcome(oks), error=error, attempts=1,
                          duration=time.monotonic() - t0, branches=summary)
        self._finished(base, r, 1, t0, branches=summary)
        return r

    def _group_outcome(self, oks: Sequence[bool | None]) -> str:
        if self.cancel.is_set():
            return rt.STEP_CANCELLED
        return rt.SUCCESS if all(oks) else rt.FAILURE

    def _for_each(self, step: Step, base: dict[str, Any]) -> rt.StepResult:
        try:
            items = self._items(step)
        except ExpressionError as err:
            return self._fail_before_start(step, base, f"for_each: {err}")
        t0 = time.monotonic()
        self.e.emit("step.started", {**base, "attempt": 1, "attempts": 1, "items": len(items),
                                     "max_parallel": step.max_parallel,
                                     "fail_fast": step.fail_fast})
        done: dict[int, rt.StepResult] = {}
        forks: dict[int, _Run] = {}
        one = step._replace(for_each=None, continue_on_error=False)

        def item(i: int) -> flow.Unit:
            def go(stop: rt.Cancel) -> bool:
                f = forks[i] = self._fork(stop, {"parent_step": self.prefix + step.id,
                                                 "item_index": i})
                f.ctx.update(item=items[i], item_index=i)
                state, _failed = f._walk([one._replace(id=f"{step.id}[{i}]",
                                                       name=f"{step.title} [{i}]")],
                                         cleanup=False)
                if f.results:
                    done[i] = f.results[-1]
                return state == rt.SUCCEEDED
            return go

        oks = flow.run_all([item(i) for i in range(len(items))], limit=step.max_parallel,
                           fail_fast=step.fail_fast, cancel=self.cancel,
                           why_failed=lambda i: f"item {i} failed")
        for i in sorted(forks):
            self._adopt(forks[i], steps=False)
        results = tuple(_item_result(items[i], done.get(i)) for i in range(len(items)))
        failed = [i for i, ok in enumerate(oks) if ok is False]
        error = None
        if failed:
            first = done.get(failed[0])
            error = f"item {failed[0]} of {len(items)} failed" + (
                f": {first.error}" if first is not None and first.error else "") + (
                f" ({len(failed)} items failed)" if len(failed) > 1 else "")
        r = rt.StepResult(step.id, self._group_outcome(oks), error=error, attempts=1,
                          duration=time.monotonic() - t0, items=results,
                          exit_code=next((done[i].exit_code for i in failed if i in done),
                                         0 if not failed else None))
        self._finished(base, r, 1, t0, items=[{k: v for k, v in x.items() if k != "item"}
                                              for x in results])
        return r

    def _items(self, step: Step) -> list[Any]:
        if isinstance(step.for_each, tuple):
            return list(step.for_each)
        parts = expressions.split((step.for_each or "").strip())
        source = parts[0].source if parts and isinstance(parts[0], expressions.Expr) else ""
        value = expressions.evaluate(source, self.ctx)
        if isinstance(value, Mapping) or not isinstance(value, (list, tuple)):
            raise ExpressionError(f"`${{{{ {source} }}}}` gave {_a(value)}, not a list; "
                                  "for_each needs a list (of texts, numbers or objects)")
        if len(value) > MAX_ITEMS:
            raise ExpressionError(f"`${{{{ {source} }}}}` gave {len(value):,} items; at most "
                                  f"{MAX_ITEMS:,} are run in one step")
        return list(value)

    def _timeout_for(self, step: Step) -> float | None:
        limits = [t for t in (step.timeout_s,
                              None if self.deadline is None else
                              max(0.0, self.deadline - time.monotonic())) if t is not None]
        return min(limits) if limits else None

    def _sleep(self, seconds: float) -> bool:
        """Wait between attempts; True if the run was cancelled meanwhile."""
        return self.cancel.wait(seconds)

    def _result(self, step: Step, x: ExecResult, capture: _Capture, attempt: int,
                duration: float) -> rt.StepResult:
        if x.cancelled:
            outcome = rt.STEP_CANCELLED
        elif x.timed_out:
            outcome = rt.STEP_TIMED_OUT
        elif x.ok:
            outcome = rt.SUCCESS
        else:
            outcome = rt.FAILURE
        error = x.error
        if x.timed_out and error is None:
            error = f"step {step.id!r} timed out"
        masked_outputs = {k: self.e.masker(v) for k, v in x.outputs.items()}
        stdout, stderr = capture.text("stdout"), capture.text("stderr")
        hosts = {name: {**entry, "stdout": capture.text("stdout", name),
                        "stderr": capture.text("stderr", name),
                        "outputs": {k: self.e.masker(v)
                                    for k, v in entry.get("outputs", {}).items()}}
                 for name, entry in x.hosts.items()}
        if len(hosts) == 1:  # one host: the step's output is that host's
            (only,) = hosts.values()
            stdout, stderr = only["stdout"], only["stderr"]
        elif hosts:
            stdout, stderr = (_prefixed(hosts, "stdout"), _prefixed(hosts, "stderr"))
        if x.error is not None:
            error = self.e.masker(x.error)
        return rt.StepResult(step.id, outcome, x.exit_code, stdout, stderr, masked_outputs,
                             duration, attempt, hosts, error)

    # ── confirm steps ───────────────────────────────────────────────────────

    def _confirm(self, step: Step, base: dict[str, Any]) -> rt.StepResult:
        try:
            question = expressions.render_text(step.confirm or "", self._step_context(step))
        except ExpressionError as err:
            return self._fail_before_start(step, base, f"confirm: {err}")
        # Shown to whoever answers, and stored for `opsrun pending`: secrets masked.
        question = self.e.masker(question)
        guarded = tuple(self.e.masker(command) for command in self._guarded(step))
        request = rt.ConfirmRequest(self.req.run_id, self.rb.name, step.id, question,
                                    guarded, step.approvers,
                                    step.timeout_s, step.on_timeout, self.req.starter)
        if self.e.confirmer is None:
            return self._fail_before_start(step, base, "no way to ask for confirmation here")
        asked_before = getattr(self.e.confirmer, "already_asked", lambda r, s: False)
        if not asked_before(self.req.run_id, step.id):  # a resumed run asked it already
            self.e.emit("confirm.asked", {**base, "question": question,
                                          "guarded": list(request.guarded),
                                          "approvers": step.approvers.as_record(),
                                          "timeout_s": step.timeout_s,
                                          "on_timeout": step.on_timeout})
        t0 = time.monotonic()
        answer = self.e.confirmer.confirm(request, self.cancel)
        if self.cancel.is_set() and not answer.approved and answer.how == "cancel":
            # Nobody answered: the question is closed, which is not an answer.
            self.e.emit("confirm.closed", {**base, "question": question,
                                           "reason": rt.cancel_reason(self.cancel)})
            return rt.StepResult(step.id, rt.STEP_CANCELLED, answer=answer.as_record())
        # An answer given from another process was audited there; say the run went on.
        self.e.emit("confirm.resumed" if answer.recorded else "confirm.answered",
                    {**base, **answer.as_record(), "question": question})
        outcome = rt.SUCCESS if answer.approved else rt.STEP_DENIED
        return rt.StepResult(step.id, outcome, duration=time.monotonic() - t0,
                             answer=answer.as_record())

    def _guarded(self, confirm_step: Step) -> list[str]:
        """Rendered commands of the steps after a confirm, up to the next confirm."""
        out: list[str] = []
        steps = list(self.rb.steps)
        if confirm_step not in steps:
            return out
        for step in steps[steps.index(confirm_step) + 1:]:
            if step.kind == "confirm":
                break
            out.append(render_display(step, self.ctx))
        return out


_OUTCOME_OF_STATE = {rt.SUCCEEDED: rt.SUCCESS, rt.FAILED: rt.FAILURE,
                     rt.CANCELLED: rt.STEP_CANCELLED, rt.INTERRUPTED: rt.STEP_CANCELLED}


def chain_depth(event: Mapping[str, Any]) -> int:
    """How many runs emitted events, one from the other, to make this event (0: none)."""
    by = event.get("emitted_by")
    depth = by.get("depth") if isinstance(by, Mapping) else 0
    return depth if isinstance(depth, int) and not isinstance(depth, bool) and depth > 0 else 0


def _a(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, str):
        return "a text"
    return "a number" if isinstance(value, (int, float)) else f"a {type(value).__name__}"


def _item_result(item: Any, r: rt.StepResult | None) -> dict[str, Any]:
    if r is None:
        return {"item": item, "outcome": rt.STEP_CANCELLED, "exit_code": None, "stdout": "",
                "outputs": {}, "error": "not started: the step stopped first"}
    return {"item": item, "outcome": r.outcome, "exit_code": r.exit_code,
            "stdout": r.stdout, "outputs": dict(r.outputs), "error": r.error}


def render_display(step: Step, ctx: dict[str, Any]) -> str:
    """A step's command as a person should read it; values that are not known yet stay as written."""
    if step.kind == "emit":
        return "emit " + json.dumps(_try_value(dict(step.emit or {}), ctx),
                                    ensure_ascii=False, default=str)
    if step.kind == "uses":
        inputs = _try_value(dict(step.inputs), ctx)
        return f"uses {step.uses}" + (
            " with " + ", ".join(f"{k}={expressions.to_text(v)}" for k, v in inputs.items())
            if inputs else "")
    if step.kind == "parallel":
        return "parallel: " + "; ".join(
            f"{name}: " + " && ".join(render_display(s, ctx) for s in steps)
            for name, steps in step.branches)
    prefix = f"[on {', '.join(step.hosts)}] " if step.hosts else ""
    if step.plan is None:
        return prefix + (step.run or "")

    def value(expr: expressions.Expr) -> Any:
        try:
            return expressions.evaluate(expr.source, ctx)
        except ExpressionError:
            return shell_words.Unknown()

    try:
        return prefix + shell_words.render(step.plan, value).display
    except ExpressionError:
        return prefix + (step.run or "")


def _prefixed(hosts: Mapping[str, Mapping[str, Any]], stream: str) -> str:
    """Several hosts' output as one text, each line after its host's name, host by host."""
    lines = [f"{name}: {line}" for name, entry in hosts.items()
             for line in str(entry[stream]).splitlines()]
    text = "\n".join(lines) + ("\n" if lines else "")
    return text[-OUTPUT_TAIL_CHARS:]


class _Capture:
    """Decodes, masks and keeps the tail of a step's output (per host), and passes it on live."""

    def __init__(self, engine: Engine, step_id: str) -> None:
        self.engine = engine
        self.step_id = step_id
        self.streams: dict[tuple[str, str | None], tuple[Any, StreamMasker]] = {}
        self.tails: dict[tuple[str, str | None], list[str]] = {}
        self.sizes: dict[tuple[str, str | None], int] = {}
        self.lock = threading.Lock()  # fan-out hosts feed from several threads

    def feed(self, stream: str, data: bytes, host: str | None) -> None:
        key = (stream, host)
        with self.lock:
            if key not in self.streams:
                self.streams[key] = (codecs.getincrementaldecoder("utf-8")("replace"),
                                     self.engine.masker.stream())
            decoder, masker = self.streams[key]
            self._emit(stream, host, masker.feed(decoder.decode(data)))

    def close(self) -> None:
        for (stream, host), (decoder, masker) in self.streams.items():
            self._emit(stream, host, masker.feed(decoder.decode(b"", final=True)) + masker.flush())

    def _emit(self, stream: str, host: str | None, text: str) -> None:
        if not text:
            return
        self._keep((stream, host), text)
        self.engine.output(self.step_id, stream, text, host)

    def _keep(self, key: tuple[str, str | None], text: str) -> None:
        tail = self.tails.setdefault(key, [])
        tail.append(text)
        self.sizes[key] = self.sizes.get(key, 0) + len(text)
        while self.sizes[key] - len(tail[0]) >= OUTPUT_TAIL_CHARS and len(tail) > 1:
            self.sizes[key] -= len(tail.pop(0))
        if self.sizes[key] > 4 * OUTPUT_TAIL_CHARS:
            joined = "".join(tail)[-OUTPUT_TAIL_CHARS:]
            tail[:] = [joined]
            self.sizes[key] = len(joined)

    def text(self, stream: str, host: str | None = None) -> str:
        return "".join(self.tails.get((stream, host), []))[-OUTPUT_TAIL_CHARS:]


# ── dry run ────────────────────────────────────────────────────────────────

class PlannedStep(NamedTuple):
    """What a step would do: run, be skipped, ask, or depend on what earlier steps do."""

    section: str  # steps | on_failure | on_denied | on_success
    step: Step
    verdict: str  # run | skip | ask | depends | error
    note: str
    command: str
    within: str = ""  # inside a step: `checks/web` (a branch), `restart` (a used runbook)


def plan(engine: Engine, req: RunRequest) -> list[PlannedStep]:
    """Render every step with the real event and params; nothing runs. Secrets are masked."""
    mask = engine.masker
    return [p._replace(note=mask(p.note), command=mask(p.command))
            for p in _plan(engine, req)]


def _plan(engine: Engine, req: RunRequest) -> list[PlannedStep]:
    ctx = engine.context(req, {})
    ctx["run"]["dry_run"] = True
    out: list[PlannedStep] = []
    try:
        ctx["env"] = {k: expressions.render_text(v, ctx) for k, v in req.runbook.env.items()}
    except ExpressionError as err:
        return [PlannedStep("steps", req.runbook.steps[0], "error", f"env: {err}", "")]
    rb = req.runbook
    for section, steps in (("steps", rb.steps), ("on_failure", rb.on_failure),
                           ("on_denied", rb.on_denied), ("on_success", rb.on_success)):
        for step in steps:
            out += _plan_nested(section, step, ctx, "")
    return out


def _plan_nested(section: str, step: Step, ctx: dict[str, Any], within: str
                 ) -> list[PlannedStep]:
    """A step's plan, then the plans of the steps inside it (branches, a used runbook)."""
    ctx = dict(ctx)
    loop_note = ""
    if step.for_each is not None:
        ctx, loop_note = _first_item(step, ctx)
    planned = _plan_step(section, step, ctx)
    if loop_note:
        planned = planned._replace(note="; ".join(n for n in (loop_note, planned.note) if n))
    out = [planned._replace(within=within)]
    for name, steps in step.branches:
        for inner in steps:
            out += _plan_nested(section, inner, ctx, f"{within}{step.id}/{name}")
    if step.kind == "uses" and step.used is not None:
        child = step.used
        try:
            given = {k: _try_value(v, ctx) for k, v in step.inputs.items()}
            typed = resolve(child.params, given)
        except ParamError:
            typed = {name: step.inputs.get(name) for name in child.params}
        child_ctx = {**ctx, "params": typed, "steps": {},
                     "run": {**ctx["run"], "runbook": child.name, "failed_step": None}}
        child_ctx["env"] = {k: _try_render(v, child_ctx) for k, v in child.env.items()}
        for section_name, steps in (("steps", child.steps), ("on_failure", child.on_failure),
                                    ("on_success", child.on_success)):
            for inner in steps:
                sub = _plan_nested(section, inner, child_ctx, f"{within}{step.id} → {child.name}"
                                   + ("" if section_name == "steps" else f" {section_name}"))
                out += sub
    return out


def _first_item(step: Step, ctx: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The context of a for_each step's first item, and a note of how many items there are."""
    if isinstance(step.for_each, tuple):
        items: Any = list(step.for_each)
    else:
        parts = expressions.split((step.for_each or "").strip())
        try:
            items = expressions.evaluate(parts[0].source, ctx) \
                if parts and isinstance(parts[0], expressions.Expr) else None
        except ExpressionError:
            return ctx, f"for each item of {step.for_each} (decided when it runs)"
    if not isinstance(items, (list, tuple)) or isinstance(items, Mapping):
        return ctx, f"for_each: {step.for_each} is {_a(items)}, not a list: the step will fail"
    if not items:
        return ctx, "for_each: no items: nothing will run"
    at_once = f", {min(step.max_parallel, len(items))} at a time" if len(items) > 1 else ""
    return ({**ctx, "item": items[0], "item_index": 0},
            f"for each of {len(items)} item{'s' * (len(items) != 1)}{at_once}; shown for "
            "the first")


def _try_value(value: Any, ctx: dict[str, Any]) -> Any:
    """render_value where it can be rendered; expressions that cannot stay as written."""
    try:
        return expressions.render_value(value, ctx)
    except ExpressionError:
        if isinstance(value, Mapping):
            return {k: _try_value(v, ctx) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [_try_value(v, ctx) for v in value]
        return _try_render(value, ctx) if isinstance(value, str) else value


def _plan_step(section: str, step: Step, ctx: dict[str, Any]) -> PlannedStep:
    verdict, note = ("ask" if step.kind == "confirm" else "run"), ""
    if step.kind == "parallel":
        note = (f"{len(step.branches)} branches at once: "
                f"{', '.join(name for name, _steps in step.branches)}; "
                + ("the first failure stops the others" if step.fail_fast
                   else "a failure lets the others finish"))
    if isinstance(step.condition, bool):
        verdict = verdict if step.condition else "skip"
        note = f"if: {step.condition}"
    elif step.condition is not None:
        try:
            verdict = verdict if expressions.truthy(step.condition, ctx) else "skip"
            note = f"if: {step.condition}"
        except ExpressionError:
            verdict, note = "depends", f"if: {step.condition} (decided by earlier steps)"
    try:
        step_ctx = dict(ctx)
        step_ctx["env"] = {**ctx["env"], **{k: _try_render(v, ctx) for k, v in step.env.items()}}
        if step.kind == "confirm":
            command = _try_render(step.confirm or "", step_ctx)
        elif step.kind == "parallel":
            command = ""  # its branches' steps follow, each on its own
        else:
            command = render_display(step, step_ctx)
    except ExpressionError as err:
        return PlannedStep(section, step, "error", str(err), step.run or "")
    return PlannedStep(section, step, verdict, note, command)


def _try_render(text: str, ctx: dict[str, Any]) -> str:
    parts = expressions.split(text)
    out = []
    for part in parts:
        if isinstance(part, expressions.Expr):
            try:
                out.append(expressions.to_text(expressions.evaluate(part.source, ctx)))
            except ExpressionError:
                out.append(f"${{{{ {part.source} }}}}")
        else:
            out.append(part)
    return "".join(out)
