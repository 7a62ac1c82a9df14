"""How close together parallel branches and for_each items start, beside bash `&`.

    python bench/flow.py [--parts N] [--repeat R]

Each part is a step `date +%s%N >> stamps` (its process records when it started). The
figure is the gap between one part's start and the next one's, sorted by time: the median
and the largest gap over the run, for
- `parallel:` with N branches, through `opsrun run` (audit log fsynced, state store),
- `for_each:` over N items with `max_parallel: N`,
- baseline: bash starting the same N commands with `&` in a loop, then `wait`.

Goal (issue 16): a branch or item starts within 5 ms of the previous one.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

GOAL_MS = 5.0


def opsrun_exe() -> list[str]:
    exe = shutil.which("opsrun", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "opsrun"]


def gaps_ms(stamps: Path) -> list[float]:
    times = sorted(int(t) for t in stamps.read_text().split())
    return [(b - a) / 1e6 for a, b in zip(times, times[1:])]


def one(tmp: Path, kind: str, parts: int, n: int) -> list[float]:
    stamps = tmp / f"{kind}-{n}.ts"
    if kind == "bash":
        subprocess.run(["bash", "-c", f"for i in $(seq {parts}); do date +%s%N >> {stamps} & "
                        "done; wait"], check=True)
        return gaps_ms(stamps)
    rb = tmp / f"{kind}.yaml"
    if kind == "parallel":
        branches = "".join(f"      b{i}: [{{run: 'date +%s%N >> {stamps}'}}]\n"
                           for i in range(parts))
        rb.write_text(f"steps:\n  - parallel:\n{branches}")
    else:
        rb.write_text(f"steps:\n  - for_each: {list(range(parts))}\n"
                      f"    max_parallel: {parts}\n    run: 'date +%s%N >> {stamps}'\n")
    env = {**os.environ, "OPSRUN_STATE_DIR": str(tmp / "state")}
    subprocess.run([*opsrun_exe(), "run", str(rb)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    return gaps_ms(stamps)


def measure(tmp: Path, parts: int = 16, repeat: int = 5) -> dict[str, tuple[float, float]]:
    """Per kind: (median gap, largest gap) in ms over `repeat` runs of `parts` parts."""
    tmp.mkdir(parents=True, exist_ok=True)
    out = {}
    for kind in ("parallel", "for_each", "bash"):
        gaps = [g for n in range(repeat) for g in one(tmp, kind, parts, n)]
        out[kind] = (statistics.median(gaps), max(gaps))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="opsrun-bench-flow-"))
    try:
        figures = measure(tmp, args.parts, args.repeat)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"start gap between parts ({args.parts} parts, {args.repeat} runs each)")
    print(f"{'':10} {'median ms':>10} {'largest ms':>11}")
    for kind, (median, largest) in figures.items():
        print(f"{kind:10} {median:10.2f} {largest:11.2f}")
    worst = max(figures["parallel"][0], figures["for_each"][0])
    print(f"goal: median under {GOAL_MS} ms: {'met' if worst < GOAL_MS else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
