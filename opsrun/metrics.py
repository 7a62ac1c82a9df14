"""The Prometheus text exposition (format 0.0.4) of opsrun's state: data in, text out.

Pure: `exposition(snapshot)` turns a `Snapshot` (gathered by opsrun.service.metrics_file
from the state store and the running service) into the text that node_exporter's textfile
collector reads. Nothing here reads a file, a clock or a socket.

Choices, so that the numbers mean what Prometheus expects of them:
- `opsrun_runs_total` counts only runs that have *ended* (their state never changes again),
  so it only grows; the states a run passes through are the gauge `opsrun_runs_in_state`.
  Every ended state of a runbook that has runs is written, 0 included, so that
  `increase(...)` sees the first failure of a runbook too.
- `opsrun_step_duration_seconds` is a histogram over every recorded step attempt, with the
  fixed buckets of STEP_BUCKETS_S: one aggregate query, no per-step state kept anywhere,
  and buckets can be summed across hosts. A confirmation step's time includes its wait.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

PREFIX = "opsrun_"
STEP_BUCKETS_S: tuple[float, ...] = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)
ENDED_STATES = ("succeeded", "failed", "denied", "timed_out", "cancelled")
# `interrupted` waits for a person (resume or cancel), so it is a "now" state, not an end.
CURRENT_STATES = ("queued", "running", "waiting", "interrupted")

Labels = tuple[tuple[str, str], ...]


class Sample(NamedTuple):
    """One line of the exposition: full name (with _bucket/_sum/_count), labels, value."""

    name: str
    labels: Labels
    value: float


class Family(NamedTuple):
    """A metric: its HELP and TYPE lines and its samples."""

    name: str
    kind: str  # counter | gauge | histogram
    help: str
    samples: tuple[Sample, ...]


class StepHistogram(NamedTuple):
    """Step attempts of one runbook: cumulative counts per STEP_BUCKETS_S bound, sum, count."""

    at_most: tuple[int, ...]
    sum_s: float
    attempts: int


class SourceHealth(NamedTuple):
    """What the running service knows of one of its sources."""

    up: bool
    last_event: float | None  # Unix time of the last event it handed over, None if none yet


@dataclass(frozen=True)
class Snapshot:
    """Everything the exposition shows, gathered at one moment."""

    runs: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (runbook, state)
    steps: Mapping[str, StepHistogram] = field(default_factory=dict)  # by runbook
    event_queue: int = 0
    oldest_question_age_s: float = 0.0
    service_up: bool = False
    sources: Mapping[str, SourceHealth] = field(default_factory=dict)  # empty: no service
    audit_records: int = 0
    notifications: Mapping[str, int] = field(default_factory=dict)  # by outbox state


NOTIFY_STATES = ("pending", "sent", "gave_up", "dropped")

# ── text format ─────────────────────────────────────────────────────────────

def escape_label_value(value: str) -> str:
    """A label value as the text format wants it between double quotes."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    """HELP text: backslash and newline escaped (double quotes stay as they are)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value: integers without a fraction, infinities as +Inf/-Inf, NaN."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2 ** 53:
        return str(int(value))
    return repr(float(value))


def format_labels(labels: Labels) -> str:
    """`{a="1",b="2"}`, or nothing for no labels."""
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels) + "}"


def render(families: Iterable[Family]) -> str:
    """The exposition text of these metric families, ending with a newline."""
    lines: list[str] = []
    for fam in families:
        lines.append(f"# HELP {fam.name} {escape_help(fam.help)}")
        lines.append(f"# TYPE {fam.name} {fam.kind}")
        lines.extend(f"{s.name}{format_labels(s.labels)} {format_value(s.value)}"
                     for s in fam.samples)
    return "\n".join(lines) + "\n"


# ── opsrun's metrics ────────────────────────────────────────────────────────

def _one(name: str, kind: str, help_text: str, value: float) -> Family:
    return Family(PREFIX + name, kind, help_text, (Sample(PREFIX + name, (), value),))


def runs_families(runs: Mapping[tuple[str, str], int]) -> list[Family]:
    """opsrun_runs_total (ended runs by runbook and state) and opsrun_runs_in_state."""
    total = PREFIX + "runs_total"
    runbooks = sorted({rb for rb, _ in runs})
    ended = tuple(Sample(total, (("runbook", rb), ("state", st)), runs.get((rb, st), 0))
                  for rb in runbooks for st in ENDED_STATES)
    now = PREFIX + "runs_in_state"
    current = tuple(Sample(now, (("state", st),),
                           sum(n for (_, s), n in runs.items() if s == st))
                    for st in CURRENT_STATES)
    return [Family(total, "counter", "Runs that ended, by runbook and final state.", ended),
            Family(now, "gauge", "Runs queued, running, waiting for an answer, or "
                                 "interrupted (waiting for resume or cancel) now.", current)]


def steps_family(steps: Mapping[str, StepHistogram]) -> Family:
    """opsrun_step_duration_seconds: a histogram of step attempts by runbook."""
    name = PREFIX + "step_duration_seconds"
    samples: list[Sample] = []
    for rb in sorted(steps):
        h = steps[rb]
        for bound, n in zip(STEP_BUCKETS_S, h.at_most):
            # repr: "1.0", as the official clients write bounds; a series is named by it
            samples.append(Sample(name + "_bucket", (("runbook", rb), ("le", repr(bound))), n))
        samples.append(Sample(name + "_bucket", (("runbook", rb), ("le", "+Inf")), h.attempts))
        samples.append(Sample(name + "_sum", (("runbook", rb),), h.sum_s))
        samples.append(Sample(name + "_count", (("runbook", rb),), h.attempts))
    return Family(name, "histogram", "Time taken by each recorded step attempt (top-level "
                  "steps; a confirmation includes its wait), by runbook.", tuple(samples))


def sources_families(sources: Mapping[str, SourceHealth]) -> list[Family]:
    """opsrun_source_up and opsrun_source_last_event_timestamp_seconds, by source."""
    up = PREFIX + "source_up"
    last = PREFIX + "source_last_event_timestamp_seconds"
    names = sorted(sources)
    return [
        Family(up, "gauge", "1 if the service's source runs, 0 if it stopped (absent when "
                            "the service does not run).",
               tuple(Sample(up, (("source", n),), int(sources[n].up)) for n in names)),
        Family(last, "gauge", "Unix time of the last event the source handed over since the "
                              "service started (absent until its first).",
               tuple(Sample(last, (("source", n),), t) for n in names
                     if (t := sources[n].last_event) is not None)),
    ]


def families(snap: Snapshot) -> list[Family]:
    """Every opsrun metric family of a snapshot, in a stable order."""
    return [
        _one("service_up", "gauge", "1 if opsrun watch runs and answers, else 0.",
             int(snap.service_up)),
        *runs_families(snap.runs),
        steps_family(snap.steps),
        _one("event_queue_depth", "gauge", "Events waiting in the durable emit queue.",
             snap.event_queue),
        _one("oldest_waiting_approval_seconds", "gauge", "Age of the oldest unanswered "
             "question of a waiting run; 0 if none waits.", snap.oldest_question_age_s),
        *sources_families(snap.sources),
        _one("audit_records_total", "counter", "Records in the audit log (its last seq).",
             snap.audit_records),
        notifications_family(snap.notifications),
    ]


def notifications_family(counts: Mapping[str, int]) -> Family:
    """opsrun_notifications: the outbox by state (zeros too, so a first gave_up shows)."""
    name = PREFIX + "notifications"
    states = [*NOTIFY_STATES, *sorted(set(counts) - set(NOTIFY_STATES))]
    return Family(name, "gauge", "Notifications in the outbox: pending (being tried), sent, "
                  "gave_up (after their attempts, or refused), dropped (answered first).",
                  tuple(Sample(name, (("state", st),), counts.get(st, 0)) for st in states))


def exposition(snap: Snapshot) -> str:
    """The whole exposition text of a snapshot."""
    return render(families(snap))
