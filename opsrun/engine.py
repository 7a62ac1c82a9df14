"""The run engine: walks a runbook's steps for one event, the same for `run` and `watch`.

It evaluates `if:`, renders values, calls an executor, applies timeouts, retries and
failure handling, and reports every transition to its listeners in order. The first
listener is the audit log: a transition it cannot record raises, and the step it announces
does not start (fail closed). The engine knows nothing of terminals, files or databases.
"""
from __future__ import annotations

import codecs
import threading
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

from opsrun import expressions, scratch, shell_words
from opsrun import run_types as rt
from opsrun.errors import ExpressionError, StateError
from opsrun.event import Event
from opsrun.executors.base import ExecRequest, ExecResult, Executor
from opsrun.identity import Identity
from opsrun.runbook import Runbook, Step
from opsrun.secrets import Masker, StreamMasker

_EMPTY_MAP: Mapping[str, Any] = MappingProxyType({})

OUTPUT_TAIL_CHARS = 64 * 1024
MAX_ENV_VALUE = 64 * 1024  # bigger event values reach steps through $OPSRUN_EVENT_FILE only


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
                 confirmer: rt.Confirmer | None = None) -> None:
        self.executors = executors
        self.listeners = list(listeners)
        self.secrets = dict(secrets or {})
        self.masker = Masker(self.secrets)
        self.confirmer = confirmer

    # ── the run ─────────────────────────────────────────────────────────────

    def run(self, req: RunRequest, cancel: threading.Event | None = None) -> rt.RunResult:
        """Run to the end (or until parked); a failed step is a result, an unwritable record raises StateError."""
        return _Run(self, req, cancel or threading.Event()).go()

    def end_run(self, run_id: str) -> None:
        """Let executors free what they keep for a run (SSH connections), however it ended."""
        for executor in self.executors.values():
            end = getattr(executor, "end_run", None)
            if end is not None:
                end(run_id)

    def emit(self, kind: str, data: dict[str, Any]) -> None:
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
            self.ordinal += 1
            if self.cancel.is_set():
                return rt.cancel_reason(self.cancel), step.id
            if self._run_timed_out() and not cleanup:
                return rt.FAILED, step.id
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
        return self._run_fields(step_id=step.id, step_name=step.title, index=ordinal,
                                step_kind=step.kind, step=step)

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
        if base["index"] == self.req.resume_at and self.req.resume_attempt > 1:
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
            if result.outcome in (rt.SUCCESS, rt.STEP_CANCELLED) or \
                    attempt == step.retry.attempts or \
                    not step.retry.retries(result.outcome, x.exit_code) or self._run_timed_out():
                break
            wait = step.retry.wait_before(attempt + 1)
            self.e.emit("step.retrying", {**base, "attempt": attempt + 1,
                                          "attempts": step.retry.attempts,
                                          "delay_s": round(wait, 3),
                                          "at": round(time.time() + wait, 3)})
            if self._sleep(wait):
                break
        return result

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


def render_display(step: Step, ctx: dict[str, Any]) -> str:
    """A step's command as a person should read it; values that are not known yet stay as written."""
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

    section: str  # steps | on_failure | on_denied
    step: Step
    verdict: str  # run | skip | ask | depends | error
    note: str
    command: str


def plan(engine: Engine, req: RunRequest) -> list[PlannedStep]:
    """Render every step with the real event and params; nothing runs. Secrets are masked."""
    mask = engine.masker
    return [PlannedStep(p.section, p.step, p.verdict, mask(p.note), mask(p.command))
            for p in _plan(engine, req)]


def _plan(engine: Engine, req: RunRequest) -> list[PlannedStep]:
    ctx = engine.context(req, {})
    ctx["run"]["dry_run"] = True
    out: list[PlannedStep] = []
    try:
        ctx["env"] = {k: expressions.render_text(v, ctx) for k, v in req.runbook.env.items()}
    except ExpressionError as err:
        return [PlannedStep("steps", req.runbook.steps[0], "error", f"env: {err}", "")]
    for section, steps in (("steps", req.runbook.steps), ("on_failure", req.runbook.on_failure),
                           ("on_denied", req.runbook.on_denied)):
        for step in steps:
            out.append(_plan_step(section, step, ctx))
    return out


def _plan_step(section: str, step: Step, ctx: dict[str, Any]) -> PlannedStep:
    verdict, note = ("ask" if step.kind == "confirm" else "run"), ""
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
