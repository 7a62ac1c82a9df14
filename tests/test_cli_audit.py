"""`opsrun audit …` through the real entry point, as a user runs it."""
from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from opsrun.audit.format import line_hash
from opsrun.audit.log import AuditLog
from opsrun.store import Store
from tests.helpers.cli import command, no_traceback, opsrun


@pytest.fixture
def state(tmp_path: Path) -> Path:
    folder = tmp_path / "state"
    with Store.open(folder) as store:
        log = AuditLog(folder / "audit.jsonl", store=store)
        log.append("run.started", run_id="01AAA", runbook={"name": "web"}, trigger="manual")
        for i in range(5):
            log.append("step.finished", run_id="01AAA", runbook={"name": "web"}, step=f"s{i}",
                       stdout=f"line {i}\x1b[2J\u202e")
        log.append("run.started", run_id="01BBB", runbook={"name": "db"})
    return folder


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def test_help_lists_the_audit_commands() -> None:
    top = opsrun("--help")
    assert top.returncode == 0 and "audit" in top.stdout
    sub = opsrun("audit", "--help")
    for name in ("verify", "show", "tail", "head"):
        assert re.search(rf"^\s+{name}\s", sub.stdout, re.M), sub.stdout


def test_verify_intact_log(state: Path) -> None:
    r = opsrun("audit", "verify", "--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    assert "verified" in r.stdout and "7 records" in r.stdout
    assert "the state store's head (seq 7)" in r.stdout
    js = opsrun("audit", "verify", "--json", env={"OPSRUN_STATE_DIR": str(state)})
    data = json.loads(js.stdout)
    assert js.returncode == 0 and data["ok"] is True and data["records"] == 7
    assert data["v"] == 1 and data["problem"] is None


def test_verify_reports_tampering_with_exit_1(state: Path) -> None:
    path = state / "audit.jsonl"
    raw = lines(path)
    raw[2] = raw[2].replace(b'"step":"s1"', b'"step":"s9"')
    path.write_bytes(b"".join(x + b"\n" for x in raw))
    r = opsrun("audit", "verify", "--state-dir", str(state))
    assert r.returncode == 1 and no_traceback(r)
    assert "TAMPERING (altered)" in r.stdout and f"{path}:3 (seq 3)" in r.stdout
    js = json.loads(opsrun("audit", "verify", "--state-dir", str(state), "--json").stdout)
    assert js["ok"] is False and js["problem"]["line"] == 3 and js["problem"]["seq"] == 3
    assert js["problem"]["reason"] == "altered" and js["records"] == 2


def test_verify_tail_cut_against_the_store(state: Path) -> None:
    path = state / "audit.jsonl"
    path.write_bytes(b"".join(x + b"\n" for x in lines(path)[:-2]))
    r = opsrun("audit", "verify", "--state-dir", str(state))
    assert r.returncode == 1 and "the last 2 record(s) were removed" in r.stdout


def test_incomplete_last_record_is_a_warning(state: Path) -> None:
    with open(state / "audit.jsonl", "ab") as f:
        f.write(b'{"v":1,"seq":8,"prev":"')
    r = opsrun("audit", "verify", "--state-dir", str(state))
    assert r.returncode == 0 and "warning: incomplete last record at line 8" in r.stdout


def test_head_and_verify_against_it(state: Path) -> None:
    r = opsrun("audit", "head", "--state-dir", str(state))
    assert r.returncode == 0
    head = r.stdout.strip()
    assert head == f"7:{line_hash(lines(state / 'audit.jsonl')[-1])}"
    js = json.loads(opsrun("audit", "head", "--state-dir", str(state), "--json").stdout)
    assert js["head"] == head and js["seq"] == 7
    ok = opsrun("audit", "verify", "--state-dir", str(state), "--head", head)
    assert ok.returncode == 0 and "the given --head (seq 7)" in ok.stdout
    other = opsrun("audit", "verify", "--state-dir", str(state), "--head", "7:" + "0" * 64)
    assert other.returncode == 1
    beyond = opsrun("audit", "verify", "--state-dir", str(state), "--head", "9:" + "0" * 64)
    assert beyond.returncode == 1 and "removed" in beyond.stdout


def test_bad_head_is_a_usage_error(state: Path) -> None:
    r = opsrun("audit", "verify", "--state-dir", str(state), "--head", "7:abc")
    assert r.returncode == 2 and "is not SEQ:HASH" in r.stderr and no_traceback(r)


def test_head_of_an_empty_log(tmp_path: Path) -> None:
    r = opsrun("audit", "head", "--state-dir", str(tmp_path))
    assert r.returncode == 1 and "has no records yet" in r.stderr and no_traceback(r)


def test_verify_without_a_state_store_says_what_it_cannot_check(tmp_path: Path) -> None:
    AuditLog(tmp_path / "ops.jsonl").append("a.b")
    r = opsrun("audit", "verify", "--state-dir", str(tmp_path / "none"), "--audit-log",
               str(tmp_path / "ops.jsonl"))
    assert r.returncode == 0 and "no state store" in r.stdout


def test_show_table_filters_and_escapes(state: Path) -> None:
    r = opsrun("audit", "show", "--state-dir", str(state))
    assert r.returncode == 0
    rows = r.stdout.splitlines()
    assert rows[0].split()[:4] == ["SEQ", "TIME", "KIND", "RUN"] and len(rows) == 8
    assert "\x1b" not in r.stdout and "\u202e" not in r.stdout
    assert "line 0\\x1b[2J\\u202e" in r.stdout
    kinds = opsrun("audit", "show", "--state-dir", str(state), "--kind", "step.*", "--limit",
                   "2")
    assert [x.split()[0] for x in kinds.stdout.splitlines()[1:]] == ["5", "6"]
    run = opsrun("audit", "show", "--state-dir", str(state), "--run", "01BBB", "--json")
    assert [json.loads(x)["seq"] for x in run.stdout.splitlines()] == [7]
    book = opsrun("audit", "show", "--state-dir", str(state), "--runbook", "web", "--json")
    assert len(book.stdout.splitlines()) == 6
    recent = opsrun("audit", "show", "--state-dir", str(state), "--since", "1h", "--json")
    assert len(recent.stdout.splitlines()) == 7
    future = opsrun("audit", "show", "--state-dir", str(state), "--since", "2999-01-01")
    assert future.returncode == 0 and future.stdout == ""


def test_show_bad_since_is_a_usage_error(state: Path) -> None:
    r = opsrun("audit", "show", "--state-dir", str(state), "--since", "last tuesday")
    assert r.returncode == 2 and "--since" in r.stderr and no_traceback(r)


def test_tail_prints_the_last_records(state: Path) -> None:
    r = opsrun("audit", "tail", "--state-dir", str(state), "-n", "2", "--json")
    assert [json.loads(x)["seq"] for x in r.stdout.splitlines()] == [6, 7]


def test_tail_follows_across_a_rotation(state: Path) -> None:
    proc = subprocess.Popen(command("audit", "tail", "-f", "-n", "1", "--json", "--state-dir",
                                    str(state)), stdout=subprocess.PIPE, text=True)
    seen: queue.Queue[int] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.put(json.loads(line)["seq"])

    threading.Thread(target=read, daemon=True).start()
    try:
        assert seen.get(timeout=30) == 7  # the existing last record
        with Store.open(state) as store:
            log = AuditLog(state / "audit.jsonl", store=store, max_segment_bytes=900)
            for i in range(12):  # many rotations, several between two looks of tail
                log.append("step.finished", n=i)
        assert list(state.glob("audit-*.jsonl"))
        got = [seen.get(timeout=30) for _ in range(12 + len(list(state.glob("audit-*.jsonl"))))]
        assert got == list(range(8, 8 + len(got)))
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130


def test_segment_size_is_configurable(tmp_path: Path, repo_root: Path) -> None:
    env = {"OPSRUN_STATE_DIR": str(tmp_path / "state"), "OPSRUN_AUDIT_SEGMENT_SIZE": "4KiB"}
    for _ in range(3):
        assert opsrun("run", str(repo_root / "runbooks" / "hello.yaml"), env=env).returncode == 0
    segments = sorted(p.name for p in (tmp_path / "state").glob("audit-*.jsonl"))
    assert segments, "a 4 KiB segment size should have started new segments"
    assert all(p.stat().st_size < 4096 + 8192 for p in (tmp_path / "state").glob("audit*.jsonl"))
    check = opsrun("audit", "verify", env=env)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("value, words", [
    ("lots", "'lots' is not a size; write a whole number and a unit, like 64MiB, "
              "500KiB or 1GiB"),
    ("100", "'100' is too small; a segment must hold a few records, so give at least 4KiB"),
])
def test_bad_segment_size_is_a_usage_error(tmp_path: Path, repo_root: Path, value: str,
                                           words: str) -> None:
    r = opsrun("run", str(repo_root / "runbooks" / "hello.yaml"),
               env={"OPSRUN_STATE_DIR": str(tmp_path / "state"),
                    "OPSRUN_AUDIT_SEGMENT_SIZE": value})
    assert r.returncode == 2 and no_traceback(r)
    assert r.stderr.strip() == f"opsrun: OPSRUN_AUDIT_SEGMENT_SIZE: {words}", r.stderr


# ── retiring old segments ───────────────────────────────────────────────────

@pytest.fixture
def segmented(tmp_path: Path) -> Path:
    """A state folder whose log has several closed segments (4 KiB each)."""
    folder = tmp_path / "seg"
    with Store.open(folder) as store:
        log = AuditLog(folder / "audit.jsonl", store=store, max_segment_bytes=4096)
        for i in range(120):
            log.append("step.finished", run_id=f"01R{i:04d}", runbook={"name": "web"},
                       stdout="x" * 120)
        log.close()
    assert len(list(folder.glob("audit-*.jsonl"))) >= 5
    return folder


def segment_names(folder: Path) -> list[str]:
    return sorted((p.name for p in folder.glob("audit-*.jsonl")),
                  key=lambda n: int(n.split("-")[1].split(".")[0]))


def test_prune_retires_old_segments_and_verify_accepts_it(segmented: Path) -> None:
    before = segment_names(segmented)
    early = f"5:{line_hash(lines(segmented / before[0])[4])}"  # a head kept long ago
    dry = opsrun("audit", "prune", "--keep", "2", "--dry-run", "--state-dir", str(segmented))
    assert dry.returncode == 0 and "would remove audit-1.jsonl" in dry.stdout
    assert segment_names(segmented) == before
    r = opsrun("audit", "prune", "--keep", "2", "--state-dir", str(segmented))
    assert r.returncode == 0, r.stdout + r.stderr
    assert segment_names(segmented) == before[-2:]
    v = opsrun("audit", "verify", "--state-dir", str(segmented))
    assert v.returncode == 0, v.stdout
    assert re.search(r"note: the log begins with audit-\d+\.jsonl at seq \d+: segments up to "
                     r"audit-\d+\.jsonl \(seq 1 to \d+\) were pruned by \S+ at ", v.stdout)
    pruned = json.loads(opsrun("audit", "show", "--kind", "audit.pruned", "--json",
                               "--state-dir", str(segmented)).stdout)
    assert [s["name"] for s in pruned["segments"]] == before[:-2]
    assert all(len(s["sha256"]) == 64 and s["records"] > 0 for s in pruned["segments"])
    # A head kept from what is gone cannot be checked any more: said so, not passed in silence.
    old = opsrun("audit", "verify", "--head", early, "--state-dir", str(segmented))
    assert old.returncode == 0, old.stdout
    assert "warning: the given --head (seq 5) lies in segments that were pruned" in old.stdout


def test_a_segment_removed_by_hand_is_still_tampering(segmented: Path) -> None:
    assert opsrun("audit", "prune", "--keep", "3", "--state-dir", str(segmented)).returncode == 0
    oldest = segment_names(segmented)[0]
    (segmented / oldest).unlink()
    v = opsrun("audit", "verify", "--state-dir", str(segmented))
    assert v.returncode == 1, v.stdout
    assert f"TAMPERING (segment_missing): segment {oldest} is missing" in v.stdout


def test_a_prune_cut_short_still_verifies_and_finishes_later(segmented: Path,
                                                             tmp_path: Path) -> None:
    before = segment_names(segmented)
    kept = tmp_path / "copies"
    kept.mkdir()
    for name in before:
        (kept / name).write_bytes((segmented / name).read_bytes())
    assert opsrun("audit", "prune", "--keep", "1", "--state-dir", str(segmented)).returncode == 0
    # As if the removal had stopped after the first two files: the rest are still there.
    for name in before[2:-1]:
        (segmented / name).write_bytes((kept / name).read_bytes())
    v = opsrun("audit", "verify", "--state-dir", str(segmented))
    assert v.returncode == 0, v.stdout
    assert f"the log begins with {before[2]}" in v.stdout
    assert opsrun("audit", "prune", "--keep", "1", "--state-dir", str(segmented)).returncode == 0
    assert segment_names(segmented) == before[-1:]
    assert opsrun("audit", "verify", "--state-dir", str(segmented)).returncode == 0


def test_prune_refuses_a_log_that_does_not_verify(segmented: Path) -> None:
    target = segmented / "audit-2.jsonl"
    target.write_bytes(target.read_bytes().replace(b'"stdout":"x', b'"stdout":"y', 1))
    r = opsrun("audit", "prune", "--keep", "1", "--state-dir", str(segmented))
    assert r.returncode == 1 and no_traceback(r)
    assert "does not verify" in r.stderr and "nothing was pruned" in r.stderr
    assert (segmented / "audit-1.jsonl").exists()


def test_prune_before_a_date(segmented: Path) -> None:
    names = segment_names(segmented)
    r = opsrun("audit", "prune", "--before", "2000-01-01", "--state-dir", str(segmented))
    assert r.returncode == 0 and "nothing to prune" in r.stdout
    r = opsrun("audit", "prune", "--before", "2999-01-01", "--state-dir", str(segmented))
    assert r.returncode == 0, r.stderr
    assert segment_names(segmented) == names[-1:]  # the newest closed segment stays
    assert opsrun("audit", "verify", "--state-dir", str(segmented)).returncode == 0
