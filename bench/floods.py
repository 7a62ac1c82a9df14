"""Floods at the issue's sizes: 100,000 JSON events through `dispatch` (dry run, and real
runs for one in 100) and through `emit`, 50,000 log lines in a burst, 1,000 files at once.

    python bench/floods.py [--only NAME ...] [--scale X]

Each flood checks that nothing was lost or done twice (tests/floods.py) and reports its
time and the peak RSS of the process that took it (VmHWM of `opsrun watch`, ru_maxrss of
`opsrun dispatch`).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.floods import FLOODS, FULL, in_temp  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=sorted(FLOODS), default=None)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every size")
    args = ap.parse_args()
    failed = 0
    for name in args.only or list(FLOODS):
        t0 = time.monotonic()
        try:
            figure = in_temp(name, int(FULL[name] * args.scale))
        except AssertionError as e:
            failed += 1
            print(f"{name}: FAILED: {str(e)[:2000]}", flush=True)
            continue
        print(f"{figure.line()} (wall {time.monotonic() - t0:.1f} s with start-up)",
              flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
