"""Event latency of `opsrun watch`, beside inotifywait + bash, measured in the same run.

    python bench/latency.py [--rounds N]

- file: a file is written → the first step's process has started (it records the time);
- emit: `opsrun emit` is started → the step's process has started (this includes the
  start-up of the emit command itself; the step starts before `emit` has finished exiting);
- baseline: `inotifywait -m` piped into a bash loop doing the same on the same folder.

Goals on this machine: median under 100 ms, within 5x of inotifywait + bash.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def opsrun_exe() -> list[str]:
    exe = shutil.which("opsrun", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "opsrun"]


def wait_for(predicate, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.002)
    raise TimeoutError("condition not met")


def stamp_count(path: Path) -> int:
    return len(path.read_text().split()) if path.exists() else 0


def last_stamp(path: Path) -> float:
    return int(path.read_text().split()[-1]) / 1e9


def measure_files(drop: Path, stamps: Path, rounds: int, prefix: str) -> list[float]:
    out = []
    for i in range(rounds):
        before = stamp_count(stamps)
        t0 = time.time()
        (drop / f"{prefix}-{i}.txt").write_text("x")
        wait_for(lambda: stamp_count(stamps) > before)
        out.append((last_stamp(stamps) - t0) * 1000)
        time.sleep(0.3)  # let the debounce windows of the two watchers settle apart
    return out


def measure_emit(env: dict[str, str], stamps: Path, rounds: int) -> list[float]:
    # From the moment `opsrun emit` is started: the step usually starts before the emit
    # process has even finished exiting, so "after it returned" would be negative.
    out = []
    for i in range(rounds):
        before = stamp_count(stamps)
        t0 = time.time()
        subprocess.run([*opsrun_exe(), "emit", json.dumps({"kind": "bench", "i": i})],
                       env=env, check=True, capture_output=True)
        wait_for(lambda: stamp_count(stamps) > before)
        out.append((last_stamp(stamps) - t0) * 1000)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    if shutil.which("inotifywait") is None:
        print("inotifywait is missing: apt-get install inotify-tools", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="opsrun-latency-"))
    rb, drop, drop2 = tmp / "runbooks", tmp / "drop", tmp / "drop2"
    for d in (rb, drop, drop2):
        d.mkdir()
    file_stamps, emit_stamps, base_stamps = tmp / "file.ts", tmp / "emit.ts", tmp / "base.ts"
    (rb / "file.yaml").write_text(
        f'on: [{{file: {{paths: ["{drop}/*.txt"], events: [added]}}}}]\n'
        "concurrency: {policy: parallel}\n"
        f"steps:\n  - run: date +%s%N >> {file_stamps}\n")
    (rb / "emit.yaml").write_text(
        "on: [{event: {where: {kind: bench}}}]\nconcurrency: {policy: parallel}\n"
        f"steps:\n  - run: date +%s%N >> {emit_stamps}\n")
    env = {**os.environ, "OPSRUN_STATE_DIR": str(tmp / "state")}
    watch = subprocess.Popen([*opsrun_exe(), "watch", "--runbooks", str(rb)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    baseline = subprocess.Popen(
        ["bash", "-c", f"inotifywait -q -m -e close_write --format %f {drop2} | "
                       f"while read -r f; do date +%s%N >> {base_stamps}; done"],
        start_new_session=True)
    try:
        assert watch.stderr is not None
        for line in watch.stderr:
            if "ready" in line:
                break
        time.sleep(1.0)  # inotifywait prints nothing when its watches are up
        base = measure_files(drop2, base_stamps, args.rounds, "b")
        file_ = measure_files(drop, file_stamps, args.rounds, "o")
        emit = measure_emit(env, emit_stamps, args.rounds)
    finally:
        watch.send_signal(signal.SIGTERM)
        watch.wait(timeout=60)
        os.killpg(baseline.pid, signal.SIGTERM)
        shutil.rmtree(tmp, ignore_errors=True)
    med = statistics.median
    print(f"{'event → first step started':40} {'median':>9} {'p90':>9} {'× baseline':>11}")
    for name, xs in (("inotifywait + bash (baseline)", base),
                     ("opsrun watch: file written", file_),
                     ("opsrun watch: `opsrun emit` started", emit)):
        p90 = sorted(xs)[int(len(xs) * 0.9) - 1]
        print(f"{name:40} {med(xs):7.1f}ms {p90:7.1f}ms {med(xs) / med(base):10.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
