"""opsrun watch / status / systemd-unit: the service, how it is doing, how to install it."""
from __future__ import annotations

import logging
from pathlib import Path

from opsrun import control_socket, output, paths, secrets
from opsrun.errors import UsageError
from opsrun.inventory import check_option as check_inventory_option
from opsrun.runs.context import open_run_context
from opsrun.service.daemon import Daemon, WatchOptions
from opsrun.service.log import DaemonLog
from opsrun.service.systemd import Notifier, unit_file


def watch(opts: WatchOptions, *, state_dir: str | None, audit_log: str | None,
          secrets_file: str | None, log_format: str) -> int:
    """Run the service until SIGTERM."""
    if log_format not in ("plain", "json"):
        raise UsageError(f"--log-format {log_format!r}: choose plain or json")
    check_inventory_option(opts.inventory)
    if not opts.runbooks_dir.is_dir():
        raise UsageError(f"the runbooks folder {opts.runbooks_dir} does not exist; give "
                         f"another with --runbooks DIR, or create it with `opsrun init "
                         f"{opts.runbooks_dir}`")
    if opts.metrics_file is not None:
        from opsrun.service.metrics_file import check_path

        check_path(opts.metrics_file)
    log = DaemonLog(log_format)
    logging.getLogger("opsrun").addHandler(log.handler())
    logging.getLogger("opsrun").setLevel(logging.INFO)
    logging.getLogger("opsrun").propagate = False
    secret_values = secrets.load(Path(secrets_file) if secrets_file else None)
    opts.webhook.check(secret_values)
    # The service's bookkeeping is not synced transaction by transaction: see store.py.
    with open_run_context(state_dir, audit_log, secret_values, durable_store=False,
                          accept_new_hosts=opts.accept_new_hosts) as rc:
        return Daemon(opts, rc, log, Notifier()).run()


def status(state_dir: str | None, *, as_json: bool) -> int:
    """How the running service is doing; exit 1 when none runs."""
    folder = paths.state_dir_from_env(state_dir)
    try:
        reply = control_socket.request(folder / paths.CONTROL_SOCKET, {"op": "status"}, timeout_s=10)
    except control_socket.ControlUnavailable:
        if as_json:
            output.print_json({"version": 1, "running": False})
        else:
            print(f"opsrun watch is not running (no service answers on "
                  f"{folder / paths.CONTROL_SOCKET})")
        return 1
    s = reply.data.get("status", {})
    if as_json:
        output.print_json({"version": 1, "running": True, **s})
        return 0
    print(f"opsrun watch is running (pid {s.get('pid')}, up {_up(s.get('uptime_s', 0))})")
    print(f"  runbooks:    {len(s.get('runbooks', []))} ({', '.join(s.get('runbooks', []))})")
    print("  sources:     " + ", ".join(f"{k} ({v})" if v > 1 else k
                                        for k, v in s.get("sources", {}).items()))
    print(f"  runs:        {s.get('runs_running')} running (max {s.get('max_parallel')}), "
          f"{s.get('runs_waiting')} waiting for an answer, {s.get('runs_queued')} queued")
    print(f"  event queue: {s.get('event_queue')}")
    if s.get("webhook_url"):
        print(f"  webhooks:    {s['webhook_url']}")
    notes = s.get("notifications") or {}
    if notes:
        print("  notify:      " + ", ".join(f"{notes[k]} {k}" for k in
                                           ("pending", "sent", "gave_up", "dropped")
                                           if notes.get(k)))
    if s.get("throttle_windows"):
        print(f"  throttles:   {s['throttle_windows']} window(s) open (`throttle:`)")
    if s.get("gap"):
        from opsrun.service.gap import details, summary

        print(f"  at start:    {summary(s['gap'])}")
        for line in details(s["gap"]):
            print(f"               {line}")
    return 0


def _up(seconds: float) -> str:
    from opsrun.durations import format_duration

    return format_duration(seconds)


def systemd_unit(*, user: bool, runbooks: str | None, drain_s: float) -> int:
    print(unit_file(user=user, runbooks=runbooks, drain_s=drain_s), end="")
    return 0


def send(state_dir: str | None, payload: dict[str, object]) -> control_socket.Reply | None:
    """A request to the running service, or None when none runs."""
    folder = paths.state_dir_from_env(state_dir)
    try:
        return control_socket.request(folder / paths.CONTROL_SOCKET, payload)
    except control_socket.ControlUnavailable:
        return None


