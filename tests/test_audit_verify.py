from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from opsrun.audit.format import line_hash
from opsrun.audit.log import AuditLog
from opsrun.audit.verify import VerifyResult, verify_log
from opsrun.errors import StateError
from opsrun.store import Store
from tests.test_store import as_other_user


@pytest.fixture
def state(tmp_path: Path):
    s = Store.open(tmp_path)
    yield tmp_path, s
    s.close()


def make(folder: Path, store: Store | None, n: int = 20, segment_bytes: int | None = None
         ) -> Path:
    extra = {"max_segment_bytes": segment_bytes} if segment_bytes else {}
    log = AuditLog(folder / "audit.jsonl", store=store, **extra)
    for i in range(n):
        log.append("step.finished", run_id="01RUN", n=i)
    log.close()
    return folder / "audit.jsonl"


def read(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def write(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(x + b"\n" for x in lines))


def problem(result: VerifyResult) -> tuple[str, str, int | None, int | None]:
    assert not result.ok and result.problem is not None
    p = result.problem
    return p.reason, Path(p.file or "").name, p.line, p.seq


def test_intact_log_verifies(state) -> None:
    folder, store = state
    path = make(folder, store)
    result = verify_log(path, store=store)
    assert result.ok and result.records == 20 and result.last_seq == 20
    assert result.last_hash == line_hash(read(path)[-1]) and result.warnings == []
    assert result.heads_checked == ["the state store's head (seq 20)"]


def test_changed_field(state) -> None:
    folder, store = state
    path = make(folder, store)
    lines = read(path)
    lines[6] = lines[6].replace(b'"n":6', b'"n":66')
    write(path, lines)
    result = verify_log(path, store=store)
    assert problem(result) == ("altered", "audit.jsonl", 7, 7)
    assert "record seq 7 (line 7 of audit.jsonl) was altered" in result.problem.message
    assert result.records == 6  # records before it verified


def test_changed_last_record_is_caught_by_the_head(state) -> None:
    folder, store = state
    path = make(folder, store)
    lines = read(path)
    lines[-1] = lines[-1].replace(b'"n":19', b'"n":18')
    write(path, lines)
    assert problem(verify_log(path, store=store)) == ("altered", "audit.jsonl", 20, 20)
    assert verify_log(path).ok  # without the head there is nothing to compare it with


def test_changed_prev_of_first_record(state) -> None:
    folder, store = state
    path = make(folder, store)
    lines = read(path)
    lines[0] = lines[0].replace(b'"prev":"0', b'"prev":"1', 1)
    write(path, lines)
    assert problem(verify_log(path, store=store)) == ("altered", "audit.jsonl", 1, 1)


def test_deleted_line(state) -> None:
    folder, store = state
    path = make(folder, store)
    lines = read(path)
    del lines[9]
    write(path, lines)
    result = verify_log(path, store=store)
    assert problem(result) == ("removed", "audit.jsonl", 10, 10)
    assert "seq 10 missing" in result.problem.message


def test_several_deleted_lines(state) -> None:
    folder, store = state
    path = make(folder, store)
    lines = read(path)
    del lines[4:8]
    write(path, lines)
    result = verify_log(path, store=store)
    assert problem(result) == ("removed", "audit.jsonl", 5, 5)
    assert "4 record(s) removed" in result.problem.message and "seq 5 to 8" in \
        result.problem.message


def test_first_lines_deleted(state) -> None:
    folder, store = state
    path = make(folder, store)
    write(path, read(path)[3:])
    assert problem(verify_log(path, store=store)) == ("removed", "audit.jsonl", 1, 1)


def test_inserted_copy_of_another_record(state) -> None:
    folder, store = state
    path = make(folder, store)
    lines = read(path)
    lines.insert(5, lines[12])
    write(path, lines)
    result = verify_log(path, store=store)
    assert problem(result) == ("inserted", "audit.jsonl", 6, 13)


def test_inserted_duplicate(state) -> None:
    folder, store = state
    path = make(folder, store)
    lines = read(path)
    lines.insert(5, lines[5])
    write(path, lines)
    assert problem(verify_log(path, store=store)) == ("inserted", "audit.jsonl", 7, 6)


def test_inserted_forged_record_with_a_valid_link(state) -> None:
    """A forger who chains a new record to line 5 cannot make line 6 chain to it."""
    folder, store = state
    path = make(folder, store)
    lines = read(path)
    forged = (b'{"v":1,"seq":6,"prev":"' + line_hash(lines[4]).encode() +
              b'","time":"2025-01-01T00:00:00.000000Z","kind":"approval.answered"}')
    lines.insert(5, forged)
    write(path, lines)
    result = verify_log(path, store=store)
    assert problem(result) == ("inserted", "audit.jsonl", 6, 6)
    assert "inserted or replaced" in result.problem.message


def test_inserted_line_that_is_no_record(state) -> None:
    folder, store = state
    path = make(folder, store)
    lines = read(path)
    lines.insert(5, b'{"kind": "run.started"}')
    write(path, lines)
    assert problem(verify_log(path, store=store)) == ("inserted", "audit.jsonl", 6, None)


def test_two_lines_swapped(state) -> None:
    folder, store = state
    path = make(folder, store)
    lines = read(path)
    lines[7], lines[8] = lines[8], lines[7]
    write(path, lines)
    result = verify_log(path, store=store)
    assert problem(result) == ("reordered", "audit.jsonl", 8, 8)
    assert "swapped" in result.problem.message


def test_record_moved_further_down(state) -> None:
    folder, store = state
    path = make(folder, store)
    lines = read(path)
    lines.insert(15, lines.pop(4))
    write(path, lines)
    result = verify_log(path, store=store)
    assert problem(result) == ("reordered", "audit.jsonl", 5, 5)
    assert "line 15" in result.problem.message


@pytest.mark.parametrize("cut", [1, 3])
def test_last_lines_removed_against_the_store_head(state, cut: int) -> None:
    folder, store = state
    path = make(folder, store)
    write(path, read(path)[:-cut])
    result = verify_log(path, store=store)
    assert problem(result) == ("removed", "audit.jsonl", 20 - cut, 21 - cut)
    assert f"the last {cut} record(s) were removed" in result.problem.message
    assert verify_log(path).ok  # only the head kept elsewhere can tell


def test_given_head_is_checked(state) -> None:
    folder, store = state
    path = make(folder, store, n=10)
    head = (7, line_hash(read(path)[6]))
    assert verify_log(path, head=head).ok
    assert problem(verify_log(path, head=(7, "f" * 64))) == ("altered", "audit.jsonl", 7, 7)
    # Whoever can write both the log and state.db could rewrite everything from seq 5 on;
    # a head kept elsewhere still tells.
    write(path, read(path)[:4])
    AuditLog(path).append("forged.tail")
    assert verify_log(path).ok
    assert problem(verify_log(path, head=head)) == ("removed", "audit.jsonl", 5, 6)


def test_torn_line_in_the_middle_chained_past_is_a_warning(state) -> None:
    folder, store = state
    path = make(folder, store, n=5)
    with open(path, "ab") as f:
        f.write(read(path)[-1][:80])  # a crash in the middle of a write
    make(folder, store, n=3)  # the next writer starts a fresh line
    result = verify_log(path, store=store)
    assert result.ok and result.records == 8
    assert [(w.reason, w.line) for w in result.warnings] == [("torn_line", 6)]


def test_torn_looking_line_not_chained_past_is_tampering(state) -> None:
    folder, store = state
    path = make(folder, store, n=6)
    lines = read(path)
    lines[2] = lines[2][:60]  # a record cut short in place
    write(path, lines)
    result = verify_log(path, store=store)
    assert problem(result) == ("altered", "audit.jsonl", 3, 3)


def test_nul_bytes_from_a_power_cut_at_the_end(state) -> None:
    folder, store = state
    path = make(folder, store, n=4)
    with open(path, "ab") as f:
        f.write(b"\0" * 300)
    result = verify_log(path, store=store)
    assert result.ok and [w.reason for w in result.warnings] == ["incomplete_last_record"]
    make(folder, store, n=1)
    result = verify_log(path, store=store)
    assert result.ok and [w.reason for w in result.warnings] == ["torn_line"]


def segmented(state, n: int = 60) -> tuple[Path, Store, list[str]]:
    folder, store = state
    path = make(folder, store, n=n, segment_bytes=1500)
    names = sorted(p.name for p in folder.glob("audit-*.jsonl"))
    assert len(names) >= 4
    assert verify_log(path, store=store).ok
    return path, store, names


def test_middle_segment_removed(state) -> None:
    path, store, names = segmented(state)
    (path.parent / "audit-2.jsonl").unlink()
    result = verify_log(path, store=store)
    assert problem(result)[:3] == ("segment_missing", "audit-3.jsonl", 1)
    assert "segment audit-2.jsonl is missing between audit-1.jsonl and audit-3.jsonl" in \
        result.problem.message


def test_first_segment_removed(state) -> None:
    path, store, names = segmented(state)
    (path.parent / "audit-1.jsonl").unlink()
    assert problem(verify_log(path, store=store))[:3] == ("segment_missing", "audit-2.jsonl", 1)


def test_last_closed_segment_removed(state) -> None:
    path, store, names = segmented(state)
    (path.parent / names[-1]).unlink()
    result = verify_log(path, store=store)
    assert problem(result)[:3] == ("segment_missing", "audit.jsonl", 1)


def test_current_segment_removed(state) -> None:
    path, store, names = segmented(state)
    path.unlink()
    result = verify_log(path, store=store)
    assert problem(result)[0] == "removed" and "audit.jsonl is missing" in result.problem.message


def test_segment_renamed(state) -> None:
    path, store, names = segmented(state)
    folder = path.parent
    last = int(names[-1].split("-")[1].split(".")[0])
    (folder / names[-1]).rename(folder / f"audit-{last + 5}.jsonl")
    assert not verify_log(path, store=store).ok


def test_closed_segments_are_checked_by_digest_and_walked_when_changed(state) -> None:
    path, store, names = segmented(state)
    assert set(store.audit_checkpoints(str(path))) == {int(n[6:-6]) for n in names}
    again = verify_log(path, store=store)
    full = verify_log(path, store=store, from_start=True)
    assert again.ok and full.ok and again.records == full.records
    assert (again.last_seq, again.last_hash) == (full.last_seq, full.last_hash)
    second = path.parent / "audit-2.jsonl"
    lines = read(second)
    lines[2] = lines[2].replace(b'"n":', b'"n":1')
    write(second, lines)
    result = verify_log(path, store=store)
    assert problem(result)[:3] == ("altered", "audit-2.jsonl", 3)


def test_no_log_yet(tmp_path: Path) -> None:
    result = verify_log(tmp_path / "audit.jsonl")
    assert result.ok and result.records == 0 and result.warnings[0].reason == "no_log"


def test_unreadable_log_is_a_clear_error(tmp_path: Path) -> None:
    def setup(folder: Path) -> None:
        make(folder, None, n=2)
        (folder / "audit.jsonl").chmod(0)

    def attempt(folder: Path) -> str:
        try:
            verify_log(folder / "audit.jsonl")
        except StateError as e:
            return str(e)
        return "verified"

    assert "cannot read the audit log" in as_other_user(tmp_path, attempt, setup)


def test_verify_while_another_process_appends_and_rotates(state) -> None:
    folder, store = state
    make(folder, store, n=5)
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from pathlib import Path
        from opsrun.audit.log import AuditLog
        from opsrun.store import Store
        log = AuditLog(Path({str(folder / "audit.jsonl")!r}),
                       store=Store.open(Path({str(folder)!r})), max_segment_bytes=3000)
        for i in range(600):
            log.append("step.finished", n=i)
    """)])
    results = []
    while writer.poll() is None or not results:
        results.append(verify_log(folder / "audit.jsonl", store=store))
    assert writer.wait(timeout=60) == 0
    for r in results:
        assert r.ok, r.problem
        assert r.warnings == []
    final = verify_log(folder / "audit.jsonl", store=store, from_start=True)
    assert final.ok and final.records >= 605
