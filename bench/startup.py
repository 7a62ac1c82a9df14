"""Start-up time of opsrun beside the floor of the machine, measured in the same run.

    python bench/startup.py [--runs N]

Prints the median and best wall time of each command. The goal for `opsrun --help` is under
150 ms and within 3x of `python -c pass`.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(argv: list[str], runs: int, env: dict[str, str]) -> list[float]:
    subprocess.run(argv, env=env, capture_output=True, check=False)  # warm the page cache
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, check=False)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    exe = shutil.which("opsrun", path=str(Path(sys.executable).parent)) or shutil.which("opsrun")
    if exe is None:
        print("opsrun is not installed next to this python; run: pip install .", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="opsrun-bench-"))
    (tmp / "true.yaml").write_text("steps:\n  - run: 'true'\n")
    env = {**os.environ, "OPSRUN_STATE_DIR": str(tmp / "state"), "NO_COLOR": "1"}
    cases = [
        ("python -c pass", [sys.executable, "-c", "pass"]),
        ("bash -c true", ["bash", "-c", "true"]),
        ("opsrun --help", [exe, "--help"]),
        ("opsrun --version", [exe, "--version"]),
        ("opsrun validate (1 runbook)", [exe, "validate", str(tmp / "true.yaml")]),
    ]
    from opsrun import cli  # noqa: F401  - only to see whether `run` exists yet

    if "run" in {c.name for c in cli.app.registered_commands}:
        cases.append(("opsrun run (one `true` step)", [exe, "run", str(tmp / "true.yaml")]))
    results = {name: timed(argv, args.runs, env) for name, argv in cases}
    base = statistics.median(results["python -c pass"])
    print(f"{'command':34} {'median':>9} {'best':>9} {'× python':>9}")
    for name, times in results.items():
        med = statistics.median(times)
        print(f"{name:34} {med:8.1f}ms {min(times):8.1f}ms {med / base:8.1f}x")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
