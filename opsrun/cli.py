"""The command line: declares commands and options, and hands plain values to opsrun.commands.

Nothing else happens here. Each command module is imported only when its command runs, so
that `opsrun --help` stays fast.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from opsrun import __version__, error_handler

app = typer.Typer(
    name="opsrun",
    help="Operations runbooks that fire on events: run one now, or watch and run on events.",
    rich_markup_mode=None,
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"opsrun {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", envvar="OPSRUN_DEBUG",
                               help="Show tracebacks for errors."),
) -> None:
    ctx.obj = {"debug": debug}


def _finish(ctx: typer.Context, fn: Callable[[], int]) -> None:
    """Run a command function through the one error handler and exit with its code."""
    debug = bool(ctx.obj and ctx.obj.get("debug"))
    raise typer.Exit(error_handler.call(fn, debug=debug))


_RUNBOOKS_HELP = "Runbooks folder (default ./runbooks)."


def _runbooks_opt() -> Any:
    return typer.Option(None, "--runbooks", "-r", envvar="OPSRUN_RUNBOOKS",
                        help=_RUNBOOKS_HELP, show_envvar=True)


def _inventory_opt() -> Any:
    return typer.Option(None, "--inventory", metavar="FILE",
                        help="Hosts of SSH steps (default: the inventory.yaml beside the "
                             "runbooks).")


def _state_dir_opt() -> Any:
    return typer.Option(None, "--state-dir", envvar="OPSRUN_STATE_DIR", show_envvar=True,
                        help="State folder (default $STATE_DIRECTORY, else "
                             "$XDG_STATE_HOME/opsrun: ~/.local/state/opsrun).")


def _audit_log_opt() -> Any:
    # One variable for every command: the log the commands write is the one audit reads.
    return typer.Option(None, "--audit-log", envvar="OPSRUN_AUDIT_LOG", show_envvar=True,
                        help="Audit log file (default: audit.jsonl in the state folder).")


def _secrets_file_opt() -> Any:
    return typer.Option(None, "--secrets-file", envvar="OPSRUN_SECRETS_FILE",
                        help="NAME=value file of secrets (mode 0600).")


def _accept_new_hosts_opt() -> Any:
    return typer.Option(False, "--accept-new-hosts",
                        help="Trust SSH host keys not seen before (never changed ones); "
                             "they are kept in the state folder and audited.")


# ── runbooks: init, validate, list, show, schema ────────────────────────────

@app.command("init")
def _init(
    ctx: typer.Context,
    folder: Path = typer.Argument(Path("runbooks"), metavar="[DIR]", show_default=False,
                                  help="The folder to create or fill (default ./runbooks)."),
) -> None:
    """Create a runbooks folder: a starter runbook, an inventory example, the schema."""
    from opsrun.commands import init

    _finish(ctx, lambda: init.main(folder))


@app.command("validate")
def _validate(
    ctx: typer.Context,
    paths: Optional[list[Path]] = typer.Argument(
        None, help="Runbook files or folders (default: the runbooks folder)."),
    runbooks: Optional[Path] = _runbooks_opt(),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    fmt: str = typer.Option("text", "--format", help="text, or github for GitHub Actions "
                                                     "annotations."),
    inventory: Optional[Path] = _inventory_opt(),
) -> None:
    """Check runbooks and report every problem as file:line:col."""
    from opsrun import paths as paths_mod
    from opsrun.commands import validate

    if fmt not in ("text", "github"):
        raise typer.BadParameter("use text or github", param_hint="--format")
    targets = list(paths or [paths_mod.runbooks_dir_from_env(runbooks)])
    _finish(ctx, lambda: validate.main(targets, as_json=as_json, fmt=fmt, inventory=inventory))


@app.command("list")
def _list(
    ctx: typer.Context,
    runbooks: Optional[Path] = _runbooks_opt(),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List the runbooks: name, triggers, number of steps, file."""
    from opsrun import paths as paths_mod
    from opsrun.commands import listing

    folder = paths_mod.runbooks_dir_from_env(runbooks)
    _finish(ctx, lambda: listing.main(folder, as_json=as_json))


@app.command("show")
def _show(
    ctx: typer.Context,
    runbook: str = typer.Argument(..., help="Runbook name or file path."),
    runbooks: Optional[Path] = _runbooks_opt(),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show a runbook as a readable plan: triggers, params, steps and their conditions."""
    from opsrun import paths as paths_mod
    from opsrun.commands import show

    folder = paths_mod.runbooks_dir_from_env(runbooks)
    _finish(ctx, lambda: show.main(runbook, folder, as_json=as_json))


@app.command("schema")
def _schema(ctx: typer.Context) -> None:
    """Print the JSON Schema of the runbook format (for editors)."""
    from opsrun.commands import schema

    _finish(ctx, schema.main)


# ── audit: verify, show, tail, head ─────────────────────────────────────────

audit_app = typer.Typer(
    help="Read and verify the tamper-evident audit log.",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def _audit_verify(
    ctx: typer.Context,
    state_dir: Optional[str] = _state_dir_opt(),
    audit_log: Optional[str] = _audit_log_opt(),
    from_start: bool = typer.Option(
        False, "--from-start", help="Walk every record of every segment, even segments "
                                    "that verified before and whose digest is unchanged."),
    head: Optional[str] = typer.Option(
        None, "--head", metavar="SEQ:HASH",
        help="Also prove the log still extends this head, as printed by `opsrun audit head`."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Check the hash chain; exit 0 if intact, 1 if records were altered, removed or added."""
    from opsrun.commands import audit as commands_audit

    _finish(ctx, lambda: commands_audit.verify(state_dir, audit_log, from_start, head,
                                               as_json))


@audit_app.command("show")
def _audit_show(
    ctx: typer.Context,
    state_dir: Optional[str] = _state_dir_opt(),
    audit_log: Optional[str] = _audit_log_opt(),
    run: Optional[str] = typer.Option(None, "--run", help="Only records of this run id."),
    runbook: Optional[str] = typer.Option(None, "--runbook", help="Only this runbook."),
    kind: Optional[str] = typer.Option(None, "--kind",
                                       help="Only this kind; globs work (step.*)."),
    since: Optional[str] = typer.Option(None, "--since",
                                        help="Only newer records: 1h, 30m, 2d, or a date."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n",
                                        help="Only the last N matching records."),
    as_json: bool = typer.Option(False, "--json", help="One JSON record per line."),
) -> None:
    """Show audit records as a table, oldest first."""
    from opsrun.commands import audit as commands_audit

    _finish(ctx, lambda: commands_audit.show(state_dir, audit_log, run, runbook, kind, since,
                                             limit, as_json))


@audit_app.command("tail")
def _audit_tail(
    ctx: typer.Context,
    state_dir: Optional[str] = _state_dir_opt(),
    audit_log: Optional[str] = _audit_log_opt(),
    follow: bool = typer.Option(False, "--follow", "-f",
                                help="Keep printing new records until interrupted."),
    lines: int = typer.Option(10, "--lines", "-n", min=0, help="How many records to start with."),
    as_json: bool = typer.Option(False, "--json", help="One JSON record per line."),
) -> None:
    """Show the last records; with -f, follow new ones (across segment rotations)."""
    from opsrun.commands import audit as commands_audit

    _finish(ctx, lambda: commands_audit.tail(state_dir, audit_log, follow, lines, as_json))


@audit_app.command("head")
def _audit_head(
    ctx: typer.Context,
    state_dir: Optional[str] = _state_dir_opt(),
    audit_log: Optional[str] = _audit_log_opt(),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Print SEQ:HASH of the last record, to keep off this machine (git, ticket, syslog)."""
    from opsrun.commands import audit as commands_audit

    _finish(ctx, lambda: commands_audit.head(state_dir, audit_log, as_json))


@audit_app.command("prune")
def _audit_prune(
    ctx: typer.Context,
    state_dir: Optional[str] = _state_dir_opt(),
    audit_log: Optional[str] = _audit_log_opt(),
    before: Optional[str] = typer.Option(
        None, "--before", metavar="DATE|DURATION",
        help="Remove closed segments whose last record is older: 90d, 2026-01-01, …"),
    keep: Optional[int] = typer.Option(None, "--keep", metavar="N",
                                       help="Keep the newest N closed segments (1 or more)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would go; remove nothing."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Retire the oldest closed segments; recorded in the chain, so verify still passes."""
    from opsrun.commands import audit as commands_audit

    _finish(ctx, lambda: commands_audit.prune(state_dir, audit_log, before, keep, dry_run,
                                              as_json))


# ── runs: run, runs, logs ───────────────────────────────────────────────────

@app.command("run")
def _run(
    ctx: typer.Context,
    runbook: str = typer.Argument(..., help="Runbook name or file path."),
    param: Optional[list[str]] = typer.Option(None, "--param", "-p", metavar="NAME=VALUE",
                                              help="A param value (repeatable)."),
    event: Optional[str] = typer.Option(None, "--event", metavar="JSON|@FILE|-",
                                        help="The event the run sees (default: a manual "
                                             "event)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show every step rendered; run "
                                                          "nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Answer every confirmation yes "
                                                        "(recorded as given by you)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document with the "
                                                       "run and every step result."),
    runbooks: Optional[Path] = _runbooks_opt(),
    state_dir: Optional[str] = _state_dir_opt(),
    audit_log: Optional[str] = _audit_log_opt(),
    secrets_file: Optional[str] = _secrets_file_opt(),
    inventory: Optional[Path] = _inventory_opt(),
    accept_new_hosts: bool = _accept_new_hosts_opt(),
) -> None:
    """Run a runbook now, step by step."""
    from opsrun import paths as paths_mod
    from opsrun.commands import run

    folder = paths_mod.runbooks_dir_from_env(runbooks)
    _finish(ctx, lambda: run.main(runbook, folder, param_args=param or [], event_arg=event,
                                  dry_run=dry_run, yes=yes, as_json=as_json,
                                  state_dir=state_dir, audit_log=audit_log,
                                  secrets_file=secrets_file, inventory=inventory,
                                  accept_new_hosts=accept_new_hosts))


@app.command("runs")
def _runs(
    ctx: typer.Context,
    runbook: Optional[str] = typer.Option(None, "--runbook", help="Only runs of this runbook."),
    state: Optional[str] = typer.Option(None, "--state", help="Only runs in this state "
                                        "(running, waiting, succeeded, failed, …)."),
    limit: int = typer.Option(20, "--limit", "-n", min=1, help="How many runs."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    state_dir: Optional[str] = _state_dir_opt(),
) -> None:
    """List recent runs, newest first."""
    from opsrun.commands import runs

    _finish(ctx, lambda: runs.list_runs(state_dir, runbook=runbook, state=state, limit=limit,
                                        as_json=as_json))


@app.command("logs")
def _logs(
    ctx: typer.Context,
    run_id: Optional[str] = typer.Argument(None, help="Run id (or its first characters); "
                                                      "default: the newest run."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    state_dir: Optional[str] = _state_dir_opt(),
) -> None:
    """Show a run's steps and the output they printed (the newest run by default)."""
    from opsrun.commands import runs

    _finish(ctx, lambda: runs.logs(state_dir, run_id, as_json=as_json))


@app.command("resume")
def _resume(
    ctx: typer.Context,
    run_id: str = typer.Argument(..., help="Run id (or its first characters)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Answer the remaining confirmations "
                                                        "yes."),
    as_json: bool = typer.Option(False, "--json", help="Print the run result as JSON."),
    state_dir: Optional[str] = _state_dir_opt(),
    audit_log: Optional[str] = _audit_log_opt(),
    secrets_file: Optional[str] = _secrets_file_opt(),
    inventory: Optional[Path] = _inventory_opt(),
    accept_new_hosts: bool = _accept_new_hosts_opt(),
) -> None:
    """Pick up a waiting or interrupted run at the step where it stopped."""
    from opsrun.commands import runs

    _finish(ctx, lambda: runs.resume_run(state_dir, audit_log, run_id, yes=yes,
                                         as_json=as_json, secrets_file=secrets_file,
                                         inventory=inventory,
                                         accept_new_hosts=accept_new_hosts))


@app.command("cancel")
def _cancel(
    ctx: typer.Context,
    run_id: str = typer.Argument(..., help="Run id (or its first characters)."),
    state_dir: Optional[str] = _state_dir_opt(),
    audit_log: Optional[str] = _audit_log_opt(),
) -> None:
    """Cancel a run that is running, waiting or interrupted."""
    from opsrun.commands import runs

    _finish(ctx, lambda: runs.cancel_run(state_dir, audit_log, run_id))


# ── approvals: pending, approve, deny ───────────────────────────────────────

@app.command("pending")
def _pending(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    state_dir: Optional[str] = _state_dir_opt(),
) -> None:
    """List the runs waiting for an answer."""
    from opsrun.commands import approvals

    _finish(ctx, lambda: approvals.pending(state_dir, as_json=as_json))


def _answer(ctx: typer.Context, run_id: str, comment: Optional[str], step: Optional[str],
            state_dir: Optional[str], audit_log: Optional[str], approve: bool) -> None:
    from opsrun.commands import approvals

    _finish(ctx, lambda: approvals.answer(state_dir, audit_log, run_id, approve=approve,
                                          comment=comment, step_id=step))


def _step_opt() -> Any:
    return typer.Option(None, "--step", help="Answer only if the run waits on this step "
                                             "(guards against answering a later question).")


@app.command("approve")
def _approve(
    ctx: typer.Context,
    run_id: str = typer.Argument(..., help="Run id (or its first characters)."),
    comment: Optional[str] = typer.Option(None, "--comment", "-m", help="Why (recorded)."),
    step: Optional[str] = _step_opt(),
    state_dir: Optional[str] = _state_dir_opt(),
    audit_log: Optional[str] = _audit_log_opt(),
) -> None:
    """Approve the step a run waits on, as yourself."""
    _answer(ctx, run_id, comment, step, state_dir, audit_log, True)


@app.command("deny")
def _deny(
    ctx: typer.Context,
    run_id: str = typer.Argument(..., help="Run id (or its first characters)."),
    comment: Optional[str] = typer.Option(None, "--comment", "-m", help="Why (recorded)."),
    step: Optional[str] = _step_opt(),
    state_dir: Optional[str] = _state_dir_opt(),
    audit_log: Optional[str] = _audit_log_opt(),
) -> None:
    """Deny the step a run waits on, as yourself."""
    _answer(ctx, run_id, comment, step, state_dir, audit_log, False)


# ── events: emit, dispatch, sources ────────────────────────────────────────

@app.command("emit")
def _emit(
    ctx: typer.Context,
    event: Optional[str] = typer.Argument(None, help="One event as JSON, or - to read JSON "
                                                     "lines from stdin."),
    state_dir: Optional[str] = _state_dir_opt(),
    audit_log: Optional[str] = _audit_log_opt(),
) -> None:
    """Queue JSON events for `opsrun watch` (they wait if it is not running)."""
    from opsrun.commands import events

    _finish(ctx, lambda: events.emit(event, state_dir=state_dir, audit_log=audit_log))


@app.command("dispatch")
def _dispatch(
    ctx: typer.Context,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print which runbooks each event "
                                                          "would start; run nothing."),
    explain: bool = typer.Option(False, "--explain", help="For each event and runbook, say "
                                 "which trigger matches or which condition fails; run "
                                 "nothing."),
    parallel: int = typer.Option(1, "--parallel", min=1, help="Runs at once (default 1: "
                                                               "in order)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    runbooks: Optional[Path] = _runbooks_opt(),
    state_dir: Optional[str] = _state_dir_opt(),
    audit_log: Optional[str] = _audit_log_opt(),
    secrets_file: Optional[str] = _secrets_file_opt(),
    inventory: Optional[Path] = _inventory_opt(),
    accept_new_hosts: bool = _accept_new_hosts_opt(),
) -> None:
    """Read JSON lines on stdin and run each event's runbooks here; exit with the worst code."""
    from opsrun import paths as paths_mod
    from opsrun.commands import events

    folder = paths_mod.runbooks_dir_from_env(runbooks)
    _finish(ctx, lambda: events.dispatch(folder, dry_run=dry_run, parallel=parallel,
                                         state_dir=state_dir, audit_log=audit_log,
                                         secrets_file=secrets_file, as_json=as_json,
                                         inventory=inventory,
                                         accept_new_hosts=accept_new_hosts, explain=explain))


@app.command("explain")
def _explain(
    ctx: typer.Context,
    runbook: str = typer.Argument(..., help="Runbook name or file path."),
    event: str = typer.Option(..., "--event", metavar="JSON|@FILE|-",
                              help="The event (a file or log event by its `source`)."),
    runbooks: Optional[Path] = _runbooks_opt(),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    state_dir: Optional[str] = _state_dir_opt(),
) -> None:
    """Say whether an event starts a runbook; if not, which condition fails, with what value."""
    from opsrun import paths as paths_mod
    from opsrun.commands import explain as explain_cmd

    folder = paths_mod.runbooks_dir_from_env(runbooks)
    _finish(ctx, lambda: explain_cmd.main(runbook, folder, event_arg=event, as_json=as_json,
                                          state_dir=state_dir))


@app.command("sources")
def _sources(
    ctx: typer.Context,
    runbooks: Optional[Path] = _runbooks_opt(),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show what `opsrun watch` would watch, and the next fires of each schedule."""
    from opsrun import paths as paths_mod
    from opsrun.commands import sources

    folder = paths_mod.runbooks_dir_from_env(runbooks)
    _finish(ctx, lambda: sources.main(folder, as_json=as_json))


# ── the service: watch, status, metrics, systemd-unit ───────────────────────

@app.command("watch")
def _watch(
    ctx: typer.Context,
    runbooks: Optional[Path] = _runbooks_opt(),
    state_dir: Optional[str] = _state_dir_opt(),
    audit_log: Optional[str] = _audit_log_opt(),
    stdin: bool = typer.Option(False, "--stdin", help="Also read JSON events, one per line, "
                                                      "from stdin."),
    max_parallel: Optional[int] = typer.Option(None, "--max-parallel", min=1,
                                               help="Runs running at once (default: cores "
                                                    "× 4)."),
    drain_limit: str = typer.Option("60s", "--drain-limit",
                                    help="On SIGTERM, how long running runs may take to "
                                         "finish before they are interrupted."),
    log_format: str = typer.Option("plain", "--log-format", help="plain or json."),
    secrets_file: Optional[str] = _secrets_file_opt(),
    inventory: Optional[Path] = _inventory_opt(),
    accept_new_hosts: bool = _accept_new_hosts_opt(),
    metrics_file: Optional[Path] = typer.Option(
        None, "--metrics-file", metavar="FILE", envvar="OPSRUN_METRICS_FILE",
        show_envvar=True, help="Write Prometheus metrics to FILE (e.g. opsrun.prom in "
                               "node_exporter's textfile folder), replaced atomically."),
    metrics_interval: str = typer.Option(
        "15s", "--metrics-interval", envvar="OPSRUN_METRICS_INTERVAL", show_envvar=True,
        help="How often --metrics-file is written."),
    webhook_listen: str = typer.Option(
        "127.0.0.1:9410", "--webhook-listen", metavar="HOST:PORT",
        envvar="OPSRUN_WEBHOOK_LISTEN", show_envvar=True,
        help="Where the webhook listener (and its /metrics) listens, when a runbook has a "
             "webhook trigger."),
    webhook_tls_cert: Optional[Path] = typer.Option(
        None, "--webhook-tls-cert", metavar="FILE", envvar="OPSRUN_WEBHOOK_TLS_CERT",
        show_envvar=True, help="Serve webhooks over HTTPS with this PEM certificate chain."),
    webhook_tls_key: Optional[Path] = typer.Option(
        None, "--webhook-tls-key", metavar="FILE", envvar="OPSRUN_WEBHOOK_TLS_KEY",
        show_envvar=True, help="The private key of --webhook-tls-cert (PEM)."),
    webhook_max_queue: int = typer.Option(
        10_000, "--webhook-max-queue", min=1, envvar="OPSRUN_WEBHOOK_MAX_QUEUE",
        show_envvar=True, help="Refuse webhook events (503) while this many events wait "
                               "in the queue."),
    webhook_metrics_token: Optional[str] = typer.Option(
        None, "--webhook-metrics-token", metavar="SECRET", envvar="OPSRUN_WEBHOOK_METRICS_TOKEN",
        show_envvar=True, help="The name of a secret that GET /metrics must send as a bearer "
                               "token (needed when not listening on loopback)."),
    notify: Optional[Path] = typer.Option(
        None, "--notify", metavar="FILE",
        help="Notification targets for every runbook (default: the notify.yaml beside the "
             "runbooks, if there is one)."),
) -> None:
    """Watch every source of every runbook and run the runbooks whose triggers match."""
    from opsrun import paths as paths_mod
    from opsrun.commands import watch as watch_cmd
    from opsrun.durations import DurationError, parse_duration
    from opsrun.service.daemon import WatchOptions
    from opsrun.service.webhooks import WebhookSettings

    from opsrun.service.metrics_file import MIN_INTERVAL_S

    try:
        drain_s = parse_duration(drain_limit)
    except DurationError as e:
        raise typer.BadParameter(str(e), param_hint="--drain-limit") from None
    try:
        metrics_s = parse_duration(metrics_interval)
    except DurationError as e:
        raise typer.BadParameter(str(e), param_hint="--metrics-interval") from None
    if metrics_s < MIN_INTERVAL_S:
        raise typer.BadParameter(f"{metrics_interval!r} is too short; use at least "
                                 f"{MIN_INTERVAL_S * 1000:g}ms", param_hint="--metrics-interval")
    opts = WatchOptions(paths_mod.runbooks_dir_from_env(runbooks), stdin=stdin,
                        drain_limit_s=drain_s, inventory=inventory,
                        accept_new_hosts=accept_new_hosts, metrics_file=metrics_file,
                        metrics_interval_s=metrics_s, notify_file=notify,
                        webhook=WebhookSettings(webhook_listen, webhook_tls_cert,
                                                webhook_tls_key, webhook_max_queue,
                                                webhook_metrics_token))
    if max_parallel:
        opts.max_parallel = max_parallel
    _finish(ctx, lambda: watch_cmd.watch(opts, state_dir=state_dir, audit_log=audit_log,
                                         secrets_file=secrets_file, log_format=log_format))


@app.command("status")
def _status(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    state_dir: Optional[str] = _state_dir_opt(),
) -> None:
    """Show whether `opsrun watch` runs, and its sources, runs and queue."""
    from opsrun.commands import watch as watch_cmd

    _finish(ctx, lambda: watch_cmd.status(state_dir, as_json=as_json))


@app.command("metrics")
def _metrics(
    ctx: typer.Context,
    state_dir: Optional[str] = _state_dir_opt(),
    audit_log: Optional[str] = _audit_log_opt(),
) -> None:
    """Print Prometheus metrics: runs, step durations, queue, approvals, sources."""
    from opsrun.commands import metrics

    _finish(ctx, lambda: metrics.main(state_dir, audit_log))


@app.command("systemd-unit")
def _systemd_unit(
    ctx: typer.Context,
    user: bool = typer.Option(False, "--user", help="A unit for `systemctl --user`."),
    runbooks: Optional[str] = typer.Option(None, "--runbooks", "-r",
                                           help="Runbooks folder the unit watches."),
    drain_limit: str = typer.Option("60s", "--drain-limit", help="Drain limit on stop."),
) -> None:
    """Print a systemd unit file for `opsrun watch`."""
    from opsrun.commands import watch as watch_cmd
    from opsrun.durations import DurationError, parse_duration

    try:
        drain_s = parse_duration(drain_limit)
    except DurationError as e:
        raise typer.BadParameter(str(e), param_hint="--drain-limit") from None
    _finish(ctx, lambda: watch_cmd.systemd_unit(user=user, runbooks=runbooks,
                                                drain_s=drain_s))


# ── shell completion ────────────────────────────────────────────────────────

@app.command("completion")
def _completion(
    ctx: typer.Context,
    shell: str = typer.Argument(..., help="bash, zsh or fish."),
) -> None:
    """Print a completion script for bash, zsh or fish."""
    from opsrun import completion_scripts

    if shell not in completion_scripts.GENERATORS:
        raise typer.BadParameter("choose bash, zsh or fish", param_hint="SHELL")
    _finish(ctx, lambda: _print(completion_scripts.GENERATORS[shell](completion_spec())))


def _print(text: str) -> int:
    sys.stdout.write(text)
    return 0


_PATH_OPTIONS = {"--runbooks": "dir", "--state-dir": "dir", "--audit-log": "file",
                 "--inventory": "file", "--secrets-file": "file", "--notify": "file",
                 "--metrics-file": "file", "--webhook-tls-cert": "file",
                 "--webhook-tls-key": "file"}
_RUNBOOK_ARGS = {"runbook", "paths"}


def completion_spec() -> Any:
    """Describe the commands and options of this CLI for the completion scripts."""
    # Duck-typed: typer vendors its own click in recent versions and uses click in older ones.
    from opsrun.completion_scripts import Cmd, Opt

    def options(cmd: Any) -> tuple[Opt, ...]:
        out = []
        for p in cmd.params:
            if p.param_type_name != "option" or getattr(p, "hidden", False):
                continue
            flags = tuple(sorted(p.opts, key=len, reverse=True))
            kind = next((_PATH_OPTIONS[f] for f in flags if f in _PATH_OPTIONS), "")
            choices = getattr(getattr(p, "type", None), "choices", None)
            if choices:
                kind = " ".join(str(c) for c in choices)
            out.append(Opt(flags, (p.help or "").split("\n")[0], not p.is_flag, kind))
        return tuple(out)

    def convert(name: str, cmd: Any) -> Cmd:
        args = [p.name for p in cmd.params if p.param_type_name == "argument"]
        argument = "runbook" if any(a in _RUNBOOK_ARGS for a in args) else (
            "words:bash zsh fish" if "shell" in args else ("file" if args else ""))
        subs: tuple[Cmd, ...] = ()
        if hasattr(cmd, "commands"):
            subs = tuple(convert(n, c) for n, c in sorted(cmd.commands.items())
                         if not getattr(c, "hidden", False))
        help_text = (cmd.short_help or (cmd.help or "").split("\n")[0]).strip()
        return Cmd(name, help_text, options(cmd), argument, subs)

    return convert("opsrun", typer.main.get_command(app))


def _just(args: list[str]) -> typer.Typer:
    """The app with only the command the arguments name, when they name one.

    Typer turns every command's signature into click objects on each start; doing that for
    the one command that will run instead of all of them saves a good part of start-up.
    """
    name = next((a for a in args if not a.startswith("-")), None)
    commands = [c for c in app.registered_commands if c.name == name]
    groups = [g for g in app.registered_groups if g.name == name]
    if not commands and not groups:
        return app  # help, a typo (click suggests the right name), …
    only = typer.Typer(name=app.info.name, help=app.info.help, rich_markup_mode=None,
                       add_completion=False, no_args_is_help=True,
                       context_settings=app.info.context_settings,
                       pretty_exceptions_enable=False)
    only.registered_callback = app.registered_callback
    only.registered_commands = commands
    only.registered_groups = groups
    return only


def main(argv: Optional[list[str]] = None) -> int:
    """Run the command line (the console script enters through opsrun.launcher)."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        _just(args)(args=args, prog_name="opsrun")
    except SystemExit as e:
        code = e.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    return 0
