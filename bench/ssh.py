"""SSH fan-out: `opsrun run` over 20 hosts, `parallel: 20` and `parallel: 1`, beside OpenSSH.

    python bench/ssh.py [--repeat N] [--hosts N]

An OpenSSH sshd is started on 127.0.0.1 (as the tests do: tests/helpers/sshd.py), and an
inventory gives it N names (default 20). Each figure is the wall time of a whole command,
process start included, as a person at a terminal sees it; the median of --repeat runs:

- opsrun, one host:                 `opsrun run` of one step `true` on one host
- opsrun, N hosts, parallel: N      one step `true` on the N names, all at once
- opsrun, N hosts, parallel: 1      the same, one host after the other
- OpenSSH, one `ssh host true`      the baseline for one host
- OpenSSH, N × `ssh host true` with `xargs -P N`   the baseline for the fan-out

Every opsrun run connects afresh (one connection per host per run), as every `ssh` does.
Nothing is asserted: tests check that fan-out works and is bounded, this shows what it costs.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers.sshd import Sshd, start_sshd  # noqa: E402 - after the path is set


def opsrun_cmd() -> list[str]:
    exe = shutil.which("opsrun", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "opsrun"]


def wall(argv: list[str], env: dict[str, str], cwd: Path, *, stdin: str | None = None) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=env, cwd=cwd, input=stdin, capture_output=True, text=True,
                       stdin=None if stdin is not None else subprocess.DEVNULL, check=False)
    took = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(argv)}\n{r.stdout}{r.stderr}")
    return took


def median(fn: object, repeat: int) -> float:
    assert callable(fn)
    fn()  # warm the caches (and the server)
    return statistics.median(fn() for _ in range(repeat))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--hosts", type=int, default=20)
    args = ap.parse_args()
    n = args.hosts
    with tempfile.TemporaryDirectory(prefix="opsrun-bench-ssh-") as tmp:
        root = Path(tmp)
        server = start_sshd(root / "sshd")
        try:
            rows = measure(server, root, n, args.repeat)
        finally:
            server.stop()
    print(f"SSH fan-out to {n} names of one local sshd; median of {args.repeat} runs; "
          f"{platform.node()} ({os.cpu_count()} cores), Python {platform.python_version()}, "
          f"{subprocess.run(['ssh', '-V'], capture_output=True, text=True).stderr.strip()}")
    width = max(len(name) for name, _ in rows)
    for name, seconds in rows:
        print(f"  {name:<{width}}  {seconds * 1000:8.0f} ms")
    return 0


def measure(server: Sshd, root: Path, n: int, repeat: int) -> list[tuple[str, float]]:
    home = root / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    known = home / ".ssh" / "known_hosts"
    known.write_text(server.host_key_line + "\n")
    env = {**os.environ, "HOME": str(home), "NO_COLOR": "1"}
    env.pop("SSH_AUTH_SOCK", None)
    rb = root / "rb"
    rb.mkdir()
    names = [f"h{i:02d}" for i in range(1, n + 1)]
    (rb / "inventory.yaml").write_text(server.inventory(names, groups=("fleet",)))
    (rb / "one.yaml").write_text("steps:\n  - host: h01\n    run: 'true'\n")
    for par in (n, 1):
        (rb / f"fan{par}.yaml").write_text(
            f"steps:\n  - hosts: [\"group:fleet\"]\n    parallel: {par}\n    run: 'true'\n")
    state = root / "state"

    def run(name: str) -> float:
        return wall([*opsrun_cmd(), "run", name, "-r", str(rb), "--state-dir", str(state)],
                    env, root)

    ssh = ["ssh", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={known}",
           "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes",
           "-i", str(server.client_key), "-p", str(server.port),
           f"{server.user}@{server.host}", "true"]
    fan_in = "\n".join(names) + "\n"
    xargs = ["xargs", "-P", str(n), "-I", "{}", *ssh]
    return [
        ("opsrun, one host", median(lambda: run("one"), repeat)),
        (f"opsrun, {n} hosts, parallel: {n}", median(lambda: run(f"fan{n}"), repeat)),
        (f"opsrun, {n} hosts, parallel: 1", median(lambda: run("fan1"), repeat)),
        ("OpenSSH, one `ssh host true`", median(lambda: wall(ssh, env, root), repeat)),
        (f"OpenSSH, {n} x `ssh host true`, xargs -P {n}",
         median(lambda: wall(xargs, env, root, stdin=fan_in), repeat)),
    ]


if __name__ == "__main__":
    raise SystemExit(main())
