"""Metrics: the exposition text, the store's counts, `opsrun metrics` on a real state folder,
and `opsrun watch --metrics-file` writing (and rewriting) its textfile."""
from __future__ import annotations

import json
import re
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from opsrun import metrics
from opsrun.errors import UsageError
from opsrun.service.metrics_file import MetricsFileWriter, check_path, collect, write_atomically
from opsrun.store import Store
from tests.helpers.cli import no_traceback, opsrun
from tests.helpers.files import write
from tests.helpers.service import Service
from tests.helpers.wait import wait_for

# ── a small parser of the text format, to read back what was written ───────

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def parse(text: str) -> tuple[dict[str, tuple[str, str]], dict[tuple[str, frozenset[Any]], float]]:
    """Families (name → (type, help)) and samples ((name, labels) → value); strict."""
    assert text.endswith("\n")
    families: dict[str, tuple[str, str]] = {}
    helps: dict[str, str] = {}
    samples: dict[tuple[str, frozenset[Any]], float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            helps[name] = help_text
        elif line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            assert name in helps and name not in families, line
            families[name] = (kind, helps[name])
        else:
            m = _SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            name, _, body, value = m.groups()
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in families or base in families, f"{name} has no TYPE before it"
            labels: dict[str, str] = {}
            rest = body or ""
            while rest:
                lm = _LABEL.match(rest)
                assert lm, f"bad labels in {line!r}"
                labels[lm.group(1)] = _unescape(lm.group(2))
                rest = rest[lm.end():]
            key = (name, frozenset(labels.items()))
            assert key not in samples, f"duplicate sample {line!r}"
            samples[key] = float(value)
    return families, samples


def value(samples: dict[tuple[str, frozenset[Any]], float], name: str,
          **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


# ── the formatter ──────────────────────────────────────────────────────────

def test_label_values_and_help_are_escaped() -> None:
    assert metrics.escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    assert metrics.escape_help('back\\slash\nnew "line"') == 'back\\\\slash\\nnew "line"'
    fam = metrics.Family("x_total", "counter", "Help\nwith a newline.",
                         (metrics.Sample("x_total", (("runbook", 'we"ird\\\nname'),), 3),))
    text = metrics.render([fam])
    assert text == ('# HELP x_total Help\\nwith a newline.\n# TYPE x_total counter\n'
                    'x_total{runbook="we\\"ird\\\\\\nname"} 3\n')
    _, samples = parse(text)
    assert value(samples, "x_total", runbook='we"ird\\\nname') == 3


def test_values_are_written_as_the_format_wants() -> None:
    assert [metrics.format_value(v) for v in (0, 7, 2.5, float("inf"), float("-inf"))] == \
        ["0", "7", "2.5", "+Inf", "-Inf"]
    assert metrics.format_value(float("nan")) == "NaN"
    assert metrics.format_value(1796630121.0797896) == "1796630121.0797896"


def test_a_snapshot_becomes_every_family_with_help_and_type() -> None:
    snap = metrics.Snapshot(
        runs={("deploy", "succeeded"): 4, ("deploy", "failed"): 1, ("deploy", "running"): 1,
              ("backup", "waiting"): 2, ("backup", "interrupted"): 1},
        steps={"deploy": metrics.StepHistogram((1, 2, 3, 3, 3, 3, 3, 3, 3), 2.75, 4)},
        event_queue=5, oldest_question_age_s=90.5, service_up=True,
        sources={"queue": metrics.SourceHealth(True, 1700000000.5),
                 "log": metrics.SourceHealth(False, None)},
        audit_records=42, notifications={"sent": 7, "gave_up": 1})
    families, samples = parse(metrics.exposition(snap))
    assert {n: k for n, (k, _) in families.items()} == {
        "opsrun_service_up": "gauge", "opsrun_runs_total": "counter",
        "opsrun_runs_in_state": "gauge", "opsrun_step_duration_seconds": "histogram",
        "opsrun_event_queue_depth": "gauge", "opsrun_oldest_waiting_approval_seconds": "gauge",
        "opsrun_source_up": "gauge", "opsrun_source_last_event_timestamp_seconds": "gauge",
        "opsrun_audit_records_total": "counter", "opsrun_notifications": "gauge"}
    assert all(h for _, h in families.values())
    # ended states only, zeros included, for every runbook that has runs
    assert value(samples, "opsrun_runs_total", runbook="deploy", state="failed") == 1
    assert value(samples, "opsrun_runs_total", runbook="backup", state="failed") == 0
    assert value(samples, "opsrun_runs_total", runbook="deploy", state="running") is None
    assert value(samples, "opsrun_runs_in_state", state="running") == 1
    assert value(samples, "opsrun_runs_in_state", state="waiting") == 2
    assert value(samples, "opsrun_runs_in_state", state="queued") == 0
    assert value(samples, "opsrun_runs_in_state", state="interrupted") == 1
    buckets = [value(samples, "opsrun_step_duration_seconds_bucket", runbook="deploy",
                     le=repr(b)) for b in metrics.STEP_BUCKETS_S]
    assert buckets == [1, 2, 3, 3, 3, 3, 3, 3, 3]
    assert value(samples, "opsrun_step_duration_seconds_bucket", runbook="deploy",
                 le="+Inf") == 4
    assert value(samples, "opsrun_step_duration_seconds_sum", runbook="deploy") == 2.75
    assert value(samples, "opsrun_step_duration_seconds_count", runbook="deploy") == 4
    assert value(samples, "opsrun_event_queue_depth") == 5
    assert value(samples, "opsrun_oldest_waiting_approval_seconds") == 90.5
    assert value(samples, "opsrun_source_up", source="log") == 0
    assert value(samples, "opsrun_source_up", source="queue") == 1
    assert value(samples, "opsrun_source_last_event_timestamp_seconds",
                 source="queue") == 1700000000.5
    assert value(samples, "opsrun_source_last_event_timestamp_seconds", source="log") is None
    assert value(samples, "opsrun_audit_records_total") == 42
    assert value(samples, "opsrun_service_up") == 1
    assert value(samples, "opsrun_notifications", state="gave_up") == 1
    assert value(samples, "opsrun_notifications", state="pending") == 0


def test_an_empty_snapshot_is_still_a_valid_exposition() -> None:
    families, samples = parse(metrics.exposition(metrics.Snapshot()))
    assert len(families) == 10
    assert value(samples, "opsrun_service_up") == 0
    assert not [k for k in samples if k[0] == "opsrun_source_up"]


# ── the store's counts ─────────────────────────────────────────────────────

def test_store_counts_step_durations_and_the_oldest_open_question(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "state")
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    a = store.create_run("deploy")
    for n, took in enumerate((0.05, 0.3, 2.0, 7200.0)):
        store.record_step(a.id, n, f"s{n}", outcome="success", started_at=t0,
                          finished_at=t0 + timedelta(seconds=took))
    store.record_step(a.id, 0, "inner", outcome="success", sub=1, started_at=t0,
                      finished_at=t0 + timedelta(seconds=1))  # inside s0: not counted twice
    store.record_step(a.id, 9, "never", outcome="skipped")  # no times: not counted
    store.update_run(a.id, state="failed")
    b = store.create_run("backup")
    store.update_run(b.id, state="waiting")
    store.create_approval(b.id, "ok", "go?")
    c = store.create_run("backup")
    store.update_run(c.id, state="succeeded")
    store.create_approval(c.id, "ok", "go?")  # of an ended run: not waiting for anyone

    assert store.run_counts() == {("deploy", "failed"): 1, ("backup", "waiting"): 1,
                                  ("backup", "succeeded"): 1}
    [d] = store.step_durations((0.1, 1.0, 3600.0))
    assert d.runbook == "deploy" and d.at_most == (1, 2, 3) and d.attempts == 4
    assert d.sum_s == pytest.approx(7202.35)
    asked = store.pending_approvals(b.id)[0].asked_at
    assert store.oldest_waiting_question() == asked
    snap = collect(store, tmp_path / "state" / "audit.jsonl", None,
                   now=asked + timedelta(seconds=30))
    assert snap.oldest_question_age_s == pytest.approx(30)
    assert not snap.service_up and snap.sources == {}
    store.close()


# ── the textfile writer ────────────────────────────────────────────────────

def test_check_path_names_the_path_and_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"nowhere/opsrun.prom: the folder .*nowhere does "
                                         "not exist"):
        check_path(tmp_path / "nowhere" / "opsrun.prom")
    with pytest.raises(UsageError, match="is a folder; give a file name in it"):
        check_path(tmp_path)
    check_path(tmp_path / "opsrun.prom")
    assert list(tmp_path.iterdir()) == []  # checking leaves nothing behind


def test_write_atomically_replaces_the_whole_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "opsrun.prom"
    write_atomically(target, "a 1\n")
    write_atomically(target, "a 2\n")
    assert target.read_text() == "a 2\n"
    assert target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["opsrun.prom"]


def test_the_writer_logs_a_failed_write_and_goes_on(tmp_path: Path) -> None:
    folder = tmp_path / "textfiles"
    folder.mkdir()
    logged: list[tuple[str, dict[str, Any]]] = []
    lock = threading.Lock()
    n = iter(range(1_000_000))

    def log(message: str, **fields: Any) -> None:
        with lock:
            logged.append((message, fields))

    writer = MetricsFileWriter(folder / "opsrun.prom", 0.01, lambda: f"n {next(n)}\n",
                               log).start()
    try:
        wait_for(lambda: (folder / "opsrun.prom").exists())
        (folder / "opsrun.prom").unlink()
        folder.rmdir()  # every write now fails
        wait_for(lambda: any(m == "cannot write the metrics file" for m, _ in logged))
        errors = [f for m, f in logged if m == "cannot write the metrics file"]
        assert errors[0]["path"] == str(folder / "opsrun.prom")
        folder.mkdir()
        wait_for(lambda: (folder / "opsrun.prom").exists())
        wait_for(lambda: any(m == "the metrics file is written again" for m, _ in logged))
        # once per kind of failure, not once per interval
        assert len([m for m, _ in logged if m == "cannot write the metrics file"]) == 1
    finally:
        writer.stop("final 1\n")
    assert (folder / "opsrun.prom").read_text() == "final 1\n"


# ── through the command line ───────────────────────────────────────────────

def test_opsrun_metrics_counts_real_runs(tmp_path: Path) -> None:
    rb = tmp_path / "runbooks"
    write(rb, "fine.yaml", "steps:\n  - run: 'true'\n  - run: echo done\n")
    write(rb, "broken.yaml", "steps:\n  - run: exit 3\n")
    env = {"OPSRUN_STATE_DIR": str(tmp_path / "state"), "OPSRUN_RUNBOOKS": str(rb)}

    before = opsrun("metrics", env=env)
    assert before.returncode == 0, before.stderr
    _, samples = parse(before.stdout)
    assert value(samples, "opsrun_audit_records_total") == 0
    assert not (tmp_path / "state").exists()  # looking does not create the state folder

    assert opsrun("run", "fine", env=env).returncode == 0
    assert opsrun("run", "fine", env=env).returncode == 0
    assert opsrun("run", "broken", env=env).returncode == 1
    r = opsrun("metrics", env=env)
    assert r.returncode == 0 and no_traceback(r), r.stderr
    _, samples = parse(r.stdout)
    assert value(samples, "opsrun_runs_total", runbook="fine", state="succeeded") == 2
    assert value(samples, "opsrun_runs_total", runbook="fine", state="failed") == 0
    assert value(samples, "opsrun_runs_total", runbook="broken", state="failed") == 1
    assert value(samples, "opsrun_step_duration_seconds_count", runbook="fine") == 4
    assert value(samples, "opsrun_step_duration_seconds_count", runbook="broken") == 1
    assert value(samples, "opsrun_service_up") == 0
    audit = (tmp_path / "state" / "audit.jsonl").read_text().splitlines()
    assert value(samples, "opsrun_audit_records_total") == json.loads(audit[-1])["seq"]


def test_watch_writes_the_metrics_file_and_updates_it(tmp_path: Path) -> None:
    rb = tmp_path / "runbooks"
    write(rb, "on-deploy.yaml", """\
        on:
          - event: {where: {type: deploy}}
        steps:
          - run: echo deployed
        """)
    prom = tmp_path / "textfiles" / "opsrun.prom"
    prom.parent.mkdir()
    svc = Service(tmp_path, rb, "--metrics-interval", "100ms",
                  env={"OPSRUN_METRICS_FILE": str(prom)})
    try:
        svc.start()

        def current() -> dict[tuple[str, frozenset[Any]], float]:
            # The file is replaced whole, so any read is a complete exposition.
            return parse(prom.read_text())[1] if prom.exists() else {}

        first = wait_for(lambda: (s := current()) and value(s, "opsrun_service_up") == 1
                         and s, message=svc.log)
        assert value(first, "opsrun_source_up", source="queue") == 1
        assert value(first, "opsrun_source_last_event_timestamp_seconds",
                     source="queue") is None
        assert svc.cli("emit", '{"type": "deploy"}').returncode == 0
        after = wait_for(lambda: (s := current()) and value(
            s, "opsrun_runs_total", runbook="on-deploy", state="succeeded") == 1 and s,
            message=svc.log)
        assert value(after, "opsrun_source_last_event_timestamp_seconds",
                     source="queue") is not None
        assert value(after, "opsrun_step_duration_seconds_count", runbook="on-deploy") == 1
        # `opsrun metrics` sees the same service
        r = svc.cli("metrics")
        _, seen = parse(r.stdout)
        assert value(seen, "opsrun_service_up") == 1
        assert value(seen, "opsrun_source_up", source="queue") == 1
        assert [p.name for p in prom.parent.iterdir()] == ["opsrun.prom"]
        assert svc.stop() == 0
        _, last = parse(prom.read_text())
        assert value(last, "opsrun_service_up") == 0  # not a stale "up" after a clean stop
        assert value(last, "opsrun_runs_total", runbook="on-deploy", state="succeeded") == 1
    finally:
        svc.close()
