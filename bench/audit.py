"""How fast is the audit log? Run by hand: `python bench/audit.py [--quick] [--dir DIR]`.

Measures, in one run and on the same disk, each figure beside its baseline:
- durable appends per second (each record fsynced before append returns), alone, with the
  state store's head update, and as group commits (append_many), beside plain os.write
  with and without fdatasync;
- verifying a 1,000,000-record log (100,000 with --quick), beside `sha256sum` of the same
  files, and again once the closed segments' digests are remembered in the state store.

Use --dir on the file system that holds the real state folder: fsync costs differ a lot
between disks, and mean nothing on tmpfs.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opsrun.audit.log import AuditLog
from opsrun.audit.verify import verify_log
from opsrun.store import Store

FIELDS: dict[str, Any] = {"run_id": "01JD5ZQ6W3Y8K0F4T1N2M7P9RS", "step": "restart", "exit_code": 0,
          "outcome": "success", "duration": 1.25, "stdout": "web.service restarted"}


def main() -> int:
    """Run the benchmark and print the figures side by side."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (seconds)")
    parser.add_argument("--dir", type=Path, help="where to write (default: a temp folder)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="opsrun-bench-", dir=args.dir))
    try:
        scale = 0.15 if args.quick else 1.0
        print(f"opsrun audit benchmark{' (quick)' if args.quick else ''} in {base} "
              f"({_fs_type(base)}), python {sys.version.split()[0]}")
        _appends(base, scale)
        _verify(base, 100_000 if args.quick else 1_000_000)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


def _appends(base: Path, scale: float) -> None:
    n = max(200, int(2000 * scale))
    sample = _sample_line(base)
    print(f"\n  {f'appends ({len(sample)}-byte records)':<44} {'records/s':>12}")
    rows: list[tuple[str, float]] = []

    def durable(store: bool) -> float:
        folder = base / f"append-{store}"
        s = Store.open(folder) if store else None
        log = AuditLog(folder / "audit.jsonl", store=s)
        log.append("warm.up")
        rate = _rate(n, lambda: log.append("step.finished", **FIELDS))
        if s is not None:
            s.close()
        return rate

    rows.append(("durable append (fdatasync each)", durable(False)))
    rows.append(("durable append + state store head", durable(True)))
    group = AuditLog(base / "group" / "audit.jsonl")
    batch = [("step.finished", FIELDS)] * 100
    rows.append(("group commit: append_many, 100 per sync",
                 _rate(max(20, int(200 * scale)), lambda: group.append_many(batch)) * 100))
    rows.append(("baseline: os.write + fdatasync per line", _raw(base, sample, n, True)))
    rows.append(("baseline: plain os.write, no sync", _raw(base, sample, n * 50, False)))
    for label, rate in rows:
        print(f"  {label:<44} {rate:>12,.0f}")


def _verify(base: Path, records: int) -> None:
    folder = base / "verify"
    log = AuditLog(folder / "audit.jsonl")
    started = time.perf_counter()
    batch = [("step.finished", FIELDS)] * 10_000
    for _ in range(records // len(batch)):
        log.append_many(batch)
    log.close()
    made = time.perf_counter() - started
    files = sorted(folder.glob("audit*.jsonl"))
    size = sum(f.stat().st_size for f in files)
    print(f"\nverify {records:,} records ({size / 1e6:.1f} MB in {len(files)} files; "
          f"written by append_many in {made:.1f} s)")
    with Store.open(folder) as store:
        t0 = time.perf_counter()
        result = verify_log(folder / "audit.jsonl", store=store, from_start=True)
        walk = time.perf_counter() - t0
        assert result.ok and result.records >= records, result.problem
        t0 = time.perf_counter()
        subprocess.run(["sha256sum", *map(str, files)], check=True, stdout=subprocess.DEVNULL)
        digest = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = verify_log(folder / "audit.jsonl", store=store)
        remembered = time.perf_counter() - t0
        assert again.ok
    print(f"  {'opsrun audit verify --from-start':<44} {walk:>8.2f} s "
          f"({result.records / walk:,.0f} records/s, {size / walk / 1e6:,.0f} MB/s)")
    print(f"  {'baseline: sha256sum of the same files':<44} {digest:>8.2f} s "
          f"({size / digest / 1e6:,.0f} MB/s)")
    print(f"  {'opsrun audit verify (segment digests kept)':<44} {remembered:>8.2f} s")
    goal = "met" if walk * 1_000_000 / records < 10 else "NOT met"
    print(f"  goal: 1,000,000 records in under 10 s: {goal} "
          f"({walk * 1_000_000 / records:.1f} s per million)")


def _rate(n: int, fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - started)


def _raw(base: Path, line: bytes, n: int, sync: bool) -> float:
    fd = os.open(base / f"raw-{sync}.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        def write() -> None:
            os.write(fd, line)
            if sync:
                os.fdatasync(fd)
        return _rate(n, write)
    finally:
        os.close(fd)


def _sample_line(base: Path) -> bytes:
    log = AuditLog(base / "sample" / "audit.jsonl")
    log.append("step.finished", **FIELDS)
    log.close()
    return (base / "sample" / "audit.jsonl").read_bytes()


def _fs_type(path: Path) -> str:
    best, kind = "", "unknown file system"
    try:
        with open("/proc/mounts") as f:
            for entry in f:
                parts = entry.split()
                mount = parts[1]
                if str(path).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
                    best, kind = mount, parts[2]
    except OSError:
        pass
    return kind


if __name__ == "__main__":
    raise SystemExit(main())
