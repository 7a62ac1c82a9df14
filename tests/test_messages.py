"""Every message a user can meet, produced from a real input and pinned word for word.

Each case makes opsrun fail the way a user would: a runbook of the invalid corpus through
the loader, or a command line through the real `opsrun` in a subprocess (usage errors,
params, events, the state folder, the audit log, approvals, run-time expression errors).
The whole text, with the exit code, must equal its block in tests/messages.snapshot.txt,
so that a change of wording is always a deliberate one that shows up in review.

After changing a message on purpose, regenerate the file and read its diff:

    OPSRUN_UPDATE_SNAPSHOT=1 .venv/bin/pytest tests/test_messages.py

Machine-specific parts are replaced before comparing: the temp folder (`<tmp>`), run ids
(`<run-id>`), process ids, user names, hashes, times and durations.
"""
from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import signal
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from opsrun.runbook import load_runbooks
from tests.helpers.cli import command
from tests.helpers.wait import wait_for

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SNAPSHOT = HERE / "messages.snapshot.txt"
UPDATE = os.environ.get("OPSRUN_UPDATE_SNAPSHOT") == "1"
HEADER = """\
# Every message of tests/test_messages.py, one block per case: `== name`, the command,
# its exit code, then what it printed. Regenerate deliberately and review the diff:
#   OPSRUN_UPDATE_SNAPSHOT=1 .venv/bin/pytest tests/test_messages.py
"""

# ── the cases ───────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Cli:
    """`opsrun ARGS` run in the workspace; {state}, {ws}, … in ARGS are filled in."""

    args: tuple[str, ...]
    stdin: bytes = b""
    env: dict[str, str] = field(default_factory=dict)


def cli(*args: str, stdin: bytes | str = b"", **env: str) -> Cli:
    return Cli(args, stdin.encode() if isinstance(stdin, str) else stdin, env)


S = ("--state-dir", "{state}")

CLI_CASES: dict[str, Cli] = {
    # the command line itself (click's own words, with opsrun's hints)
    "usage/unknown-command": cli("frobnicate"),
    "usage/command-typo": cli("validat"),
    "usage/missing-argument": cli("run"),
    "usage/unknown-option": cli("run", "hello", "--colour"),
    "usage/option-out-of-range": cli("runs", "--limit", "0", *S),
    "usage/extra-argument": cli("watch", "--drain-limit", "5", "minutes", "-r", "rb", *S),
    "usage/validate-format": cli("validate", "--format", "xml", "rb"),
    "usage/completion-shell": cli("completion", "tcsh"),
    "usage/drain-limit": cli("systemd-unit", "--drain-limit", "soon"),
    "usage/log-format": cli("watch", "--log-format", "xml", "-r", "rb", *S),
    "usage/runs-state": cli("runs", "--state", "faild", *S),
    "usage/kill-grace": cli("run", "hello", "-r", "rb", *S, OPSRUN_KILL_GRACE="soon"),
    # finding runbooks
    "runbooks/file-missing": cli("run", "nothere.yaml", *S),
    "runbooks/file-is-folder": cli("run", "rb/", *S),
    "runbooks/name-typo": cli("run", "helo", "-r", "rb", *S),
    "runbooks/folder-missing": cli("run", "hello", "-r", "nowhere", *S),
    "runbooks/validate-missing": cli("validate", "nowhere.yaml"),
    "runbooks/validate-bad": cli("validate", "bad"),
    "runbooks/show-unknown": cli("show", "nope", "-r", "rb"),
    "runbooks/show-invalid": cli("show", "x", "-r", "bad"),
    "runbooks/run-invalid": cli("run", "x", "-r", "bad", *S),
    "runbooks/list-invalid": cli("list", "-r", "bad"),
    "runbooks/sources-invalid": cli("sources", "-r", "bad"),
    "runbooks/watch-folder-missing": cli("watch", "-r", "nowhere", *S),
    "runbooks/watch-none-valid": cli("watch", "-r", "bad", *S),
    # the service's metrics file
    "metrics/folder-missing": cli("watch", "-r", "rb", "--metrics-file", "nowhere/opsrun.prom",
                                  *S),
    "metrics/file-is-folder": cli("watch", "-r", "rb", "--metrics-file", "rb", *S),
    "metrics/interval-too-short": cli("watch", "-r", "rb", "--metrics-interval", "5ms", *S),
    "metrics/interval-bad": cli("watch", "-r", "rb", *S, OPSRUN_METRICS_INTERVAL="often"),
    "runbooks/dispatch-invalid": cli("dispatch", "-r", "bad", *S, stdin="{}\n"),
    "runbooks/init-exists": cli("init", "started"),
    "runbooks/init-file-in-the-way": cli("init", "a-file"),
    # SSH steps: the inventory
    "ssh/inventory-missing": cli("run", "hello", "-r", "rb", "--inventory", "nosuch.yaml", *S),
    "ssh/inventory-bad": cli("validate", "badinv"),
    # params
    "params/unknown": cli("run", "hello", "-r", "rb", "-p", "nme=Ada", *S),
    "params/no-equals": cli("run", "hello", "-r", "rb", "-p", "name", *S),
    "params/twice": cli("run", "hello", "-r", "rb", "-p", "name=a", "-p", "name=b", *S),
    "params/not-bool": cli("run", "hello", "-r", "rb", "-p", "shout=maybe", *S),
    "params/required": cli("run", "deploy", "-r", "rb", *S),
    "params/pattern": cli("run", "deploy", "-r", "rb", "-p", "version=1.2", *S),
    "params/not-int": cli("run", "typed", "-r", "rb", "-p", "count=three", *S),
    "params/choice": cli("run", "typed", "-r", "rb", "-p", "env=dev", *S),
    # events
    "events/run-not-json": cli("run", "hello", "-r", "rb", "--event", '{"a":', *S),
    "events/run-not-object": cli("run", "hello", "-r", "rb", "--event", "[1]", *S),
    "events/run-file-missing": cli("run", "hello", "-r", "rb", "--event", "@missing.json",
                                   *S),
    "events/emit-not-json": cli("emit", "{oops}", *S),
    "events/emit-too-deep": cli("emit", '{"a":' * 70 + "1" + "}" * 70, *S),
    "events/emit-lines": cli("emit", "-", *S,
                             stdin='{"type": "ok"}\nnot json\n[1]\n"text"\n'),
    "events/dispatch-lines": cli("dispatch", "-r", "rb", *S,
                                 stdin=b'{"type": "ok"}\n\xff\xfe\n{"a": [1,\n'),
    "events/dispatch-too-big": cli("dispatch", "-r", "rb", *S,
                                   stdin='{"blob": "' + "x" * (1 << 20) + '"}\n'),
    # secrets and the state folder
    "state/secrets-readable": cli("run", "hello", "-r", "rb", "--secrets-file",
                                  "secrets-open", *S),
    "state/secrets-bad-line": cli("run", "hello", "-r", "rb", "--secrets-file",
                                  "secrets-bad", *S),
    "state/secrets-missing": cli("run", "hello", "-r", "rb", "--secrets-file", "nosuch", *S),
    "state/folder-is-a-file": cli("run", "hello", "-r", "rb", "--state-dir", "a-file"),
    "state/no-store-yet": cli("logs", "--state-dir", "{ws}/empty"),
    # run-time errors in expressions
    "runtime/not-a-number": cli("run", "fails", "-r", "rb", *S),
    "runtime/secret-not-set": cli("run", "fails", "-r", "rb", "-p", "n=3", *S),
    # the audit log
    "audit/since": cli("audit", "show", "--since", "yesterday", *S),
    "audit/head-format": cli("audit", "verify", "--head", "12:abc", *S),
    "audit/limit": cli("audit", "show", "--limit", "0", *S),
    "audit/head-empty": cli("audit", "head", "--state-dir", "{ws}/empty"),
    "audit/verify-altered": cli("audit", "verify", "--state-dir", "{ws}/altered"),
    "audit/verify-removed": cli("audit", "verify", "--state-dir", "{ws}/removed"),
    "audit/verify-moved": cli("audit", "verify", "--state-dir", "{ws}/moved"),
    "audit/run-on-cut-log": cli("run", "hello", "-r", "rb", "--state-dir", "{ws}/cut"),
    "audit/prune-what": cli("audit", "prune", *S),
    "audit/prune-keep-0": cli("audit", "prune", "--keep", "0", *S),
    # runs and approvals
    "runs/unknown-id": cli("logs", "01ZZZZZZZZ", *S),
    "runs/ambiguous-id": cli("logs", "{prefix}", "--state-dir", "{ws}/two"),
    "runs/resume-ended": cli("resume", "{done}", *S),
    "runs/resume-driven": cli("resume", "{waiting}", *S),
    "runs/cancel-ended": cli("cancel", "{done}", *S),
    "approvals/ended": cli("approve", "{done}", *S),
    "approvals/not-starter": cli("approve", "{waiting}", *S),
    "approvals/wrong-step": cli("deny", "{waiting}", "--step", "deploy", *S),
    "approvals/yes-not-starter": cli("run", "ask", "-r", "rb", "--yes", *S),
}


# ── the workspace the command lines run in ──────────────────────────────────

RUNBOOKS = {
    "typed.yaml": """\
        params:
          count: {type: int, default: 1}
          env: {type: choice, choices: [prod, staging], default: staging}
        steps:
          - run: echo ${{ params.count }} ${{ params.env }}
        """,
    "fails.yaml": """\
        params:
          n: {type: string, default: x}
        steps:
          - id: a
            run: echo ${{ params.n | int }}
          - id: b
            run: echo ${{ secrets.TOKEN }}
        """,
    "ask.yaml": """\
        steps:
          - id: approve
            confirm: Deploy now?
            approvers: {users: [USER], not_starter: true}
          - id: deploy
            run: echo deploying
        """,
}


@dataclass
class Workspace:
    root: Path
    env: dict[str, str]
    fill: dict[str, str] = field(default_factory=dict)


def clean_env(root: Path) -> dict[str, str]:
    """The environment of a user with nothing of opsrun's set (built here rather than by
    the conftest fixture, which applies per test, after this module's workspace exists)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("OPSRUN_") and k not in ("STATE_DIRECTORY", "NOTIFY_SOCKET",
                                                         "WATCHDOG_USEC", "WATCHDOG_PID")}
    env.update(HOME=str(root / "home"), XDG_STATE_HOME=str(root / "home" / "state"),
               NO_COLOR="1", COLUMNS="80", OPSRUN_KILL_GRACE="500ms")
    return env


def sh(ws: Workspace, *args: str, state: str = "state", check: bool = True) -> str:
    r = subprocess.run(command(*args, "--state-dir", str(ws.root / state)), cwd=ws.root,
                       env=ws.env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=60, check=False)
    assert not check or r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def run_ids(ws: Workspace, state: str) -> list[str]:
    data = json.loads(sh(ws, "runs", "--json", state=state))
    return [r["id"] for r in data["runs"]]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    root = tmp_path_factory.mktemp("messages")
    (root / "home").mkdir()
    ws = Workspace(root, clean_env(root))
    rb = root / "rb"
    rb.mkdir()
    for name in ("hello.yaml", "deploy.yaml", "inventory.yaml"):
        shutil.copy(ROOT / "runbooks" / name, rb / name)
    # Its group:ops may not exist here, and the warning would then join its messages.
    deploy = rb / "deploy.yaml"
    deploy.write_text(deploy.read_text().replace('"group:ops"', '"group:root"'))
    for name, text in RUNBOOKS.items():
        (rb / name).write_text(textwrap.dedent(text).replace("USER", getpass.getuser()))
    (root / "bad").mkdir()
    (root / "bad" / "x.yaml").write_text("name: x\nsteps:\n  - run: echo\n    retyr: 1\n")
    (root / "badinv").mkdir()
    (root / "badinv" / "inventory.yaml").write_text(
        "hosts:\n  web-1: {hostname: 192.0.2.1, password: hunter2}\n  web-2: {host: 192.0.2.2}\n")
    (root / "badinv" / "up.yaml").write_text("steps:\n  - run: uptime\n    host: web-1\n")
    (root / "secrets-open").write_text("TOKEN=abc\n")
    (root / "secrets-open").chmod(0o644)
    (root / "secrets-bad").write_text("TOKEN\n")
    (root / "secrets-bad").chmod(0o600)
    (root / "a-file").write_text("")
    (root / "empty").mkdir()
    (root / "started").mkdir()
    (root / "started" / "disk-usage.yaml").write_text("steps:\n  - run: df -h\n")

    sh(ws, "run", "hello", "-r", "rb")
    ws.fill["done"] = run_ids(ws, "state")[0]
    for state in ("two", "two", "altered", "removed", "cut", "moved-from"):
        sh(ws, "run", "hello", "-r", "rb", state=state)
    # Two runs a moment apart share the time part of their ids.
    ws.fill["prefix"] = os.path.commonprefix(run_ids(ws, "two"))
    _change_a_record(root / "altered" / "audit.jsonl")
    _cut_the_tail(root / "removed" / "audit.jsonl")
    _cut_the_tail(root / "cut" / "audit.jsonl")
    shutil.copytree(root / "moved-from", root / "moved")

    # A run that waits for an answer, driven by a process that stays up until the end.
    waiting = subprocess.Popen(command("run", "ask", "-r", "rb", "--state-dir",
                                       str(root / "state")),
                               cwd=root, env=ws.env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        def pending() -> str | None:
            rows = json.loads(sh(ws, "pending", "--json"))["pending"]
            return rows[0]["run_id"] if rows else None
        ws.fill["waiting"] = wait_for(pending, timeout=30, interval=0.05)
        ws.fill.update(ws=str(root), state=str(root / "state"))
        yield ws
    finally:
        os.killpg(waiting.pid, signal.SIGTERM)
        waiting.wait(timeout=30)


def _change_a_record(log: Path) -> None:
    """Change one character of the second record, the way an edit to hide something would."""
    lines = log.read_text().splitlines(keepends=True)
    changed = re.sub(r'("time": ?")2', r"\g<1>1", lines[1], count=1)
    assert changed != lines[1], lines[1]
    lines[1] = changed
    log.write_text("".join(lines))


def _cut_the_tail(log: Path) -> None:
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:-2]))


# ── producing and normalising the messages ──────────────────────────────────

RUN_ID = re.compile(r"\b[0-9A-HJKMNP-TV-Z]{26}\b")
HASH = re.compile(r"\b[0-9a-f]{64}\b")
# Times of the moment (examples inside messages, like 2025-01-31T08:00:00Z, stay).
TIME = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(\.\d+)?(\+00:00| UTC)")
TOOK = re.compile(r"\b(in|after) \d+(\.\d+)?(ms|s|m\d\ds)\b")
PID = re.compile(r"\b(pid|process) \d+")
PLACEHOLDER = re.compile(r"\{(ws|state|done|waiting|prefix)\}")


def normalise(text: str, ws: Workspace | None) -> str:
    if ws is not None:
        for path in sorted({str(ws.root), os.path.realpath(ws.root)}, key=len, reverse=True):
            text = text.replace(path, "<tmp>")
        user = getpass.getuser()
        text = re.sub(rf"(?<![\w/<-]){re.escape(user)}(?![\w-])", "<user>", text)
    text = text.replace(str(ROOT), "<repo>")
    text = RUN_ID.sub("<run-id>", text)
    text = HASH.sub("<hash>", text)
    text = TIME.sub("<time>", text)
    text = TOOK.sub(lambda m: f"{m.group(1)} <duration>", text)
    text = PID.sub(lambda m: f"{m.group(1)} <pid>", text)
    return text.rstrip("\n")


def run_cli(case: Cli, ws: Workspace) -> str:
    # Not str.format: the JSON events among the arguments are full of braces.
    args = [PLACEHOLDER.sub(lambda m: ws.fill[m.group(1)], a) for a in case.args]
    r = subprocess.run(command(*args), cwd=ws.root, env={**ws.env, **case.env},
                       input=case.stdin, capture_output=True, timeout=60, check=False)
    out = (r.stdout + r.stderr).decode("utf-8", "replace")
    shown = " ".join(_shown_arg(a) for a in case.args)
    env = "".join(f"{k}={v} " for k, v in case.env.items())
    stdin = f" < {len(case.stdin):,} bytes" if case.stdin else ""
    text = normalise(f"$ {env}opsrun {shown}{stdin}\nexit {r.returncode}\n{out}", ws)
    # The common start of two run ids depends on when they ran.
    return text.replace(f"'{ws.fill['prefix']}'", "'<prefix>'")


def _shown_arg(arg: str) -> str:
    return arg if len(arg) <= 40 else f"{arg[:30]}…({len(arg)} chars)"


def load_messages(path: Path) -> str:
    """Every problem the loader reports for a file or folder, as `opsrun validate` shows it."""
    _, problems = load_runbooks([path])
    return normalise("\n".join(str(p) for p in problems).replace(str(HERE), "tests"), None)


def runbook_messages() -> dict[str, Callable[[], str]]:
    """One case per file of the invalid corpus, and the folder of two runbooks of one name."""
    out: dict[str, Callable[[], str]] = {
        f"runbook/{p.stem}": (lambda p=p: load_messages(p))
        for p in sorted((HERE / "invalid").glob("*.yaml"))}
    out["runbook/duplicate-names"] = lambda: load_messages(HERE / "invalid_dupnames")
    return out


RUNBOOK_CASES = runbook_messages()
ALL_CASES = sorted([*RUNBOOK_CASES, *(f"cli/{n}" for n in CLI_CASES)])


@pytest.fixture(scope="module")
def messages(workspace: Workspace) -> dict[str, str]:
    got = {name: load() for name, load in RUNBOOK_CASES.items()}
    # Independent subprocesses: run them side by side (about 6 s instead of 25 s).
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = {f"cli/{n}": pool.submit(run_cli, c, workspace) for n, c in CLI_CASES.items()}
        got.update({n: f.result() for n, f in futures.items()})
    if UPDATE:
        write_snapshot(got)
    return got


def read_snapshot() -> dict[str, str]:
    if not SNAPSHOT.exists():
        return {}
    blocks: dict[str, str] = {}
    name = None
    lines: list[str] = []
    for line in SNAPSHOT.read_text().splitlines():
        if line.startswith("== "):
            if name is not None:
                blocks[name] = "\n".join(lines).rstrip("\n")
            name, lines = line[3:], []
        elif name is not None:
            lines.append(line)
    if name is not None:
        blocks[name] = "\n".join(lines).rstrip("\n")
    return blocks


def write_snapshot(got: dict[str, str]) -> None:
    body = "".join(f"\n== {name}\n{got[name]}\n" for name in sorted(got))
    SNAPSHOT.write_text(HEADER + body)


# ── the tests ───────────────────────────────────────────────────────────────

def test_enough_messages() -> None:
    assert len(CLI_CASES) >= 60 and len(RUNBOOK_CASES) >= 60


@pytest.mark.parametrize("name", ALL_CASES)
def test_message(name: str, messages: dict[str, str]) -> None:
    text = messages[name]
    assert "Traceback" not in text and "internal error" not in text, text
    expected = read_snapshot().get(name)
    assert expected is not None, (
        f"{name} is not in {SNAPSHOT.name}; add it with OPSRUN_UPDATE_SNAPSHOT=1:\n{text}")
    assert text == expected, (
        f"the message of {name} changed; if that is deliberate, regenerate "
        f"{SNAPSHOT.name} with OPSRUN_UPDATE_SNAPSHOT=1 and review the diff")


def test_no_stale_snapshot_entries(messages: dict[str, str]) -> None:
    stale = sorted(set(read_snapshot()) - set(messages))
    assert not stale, f"cases no longer produced, remove them (OPSRUN_UPDATE_SNAPSHOT=1): {stale}"


# Cases where the command succeeds but must say what it could not check.
WARNINGS = {"cli/audit/verify-moved"}


def test_cli_failures_are_one_clear_message(messages: dict[str, str]) -> None:
    """Every failing command says it in words and exits 1, 2 or 3; none is silent."""
    for name, text in messages.items():
        if not name.startswith("cli/"):
            continue
        code = int(text.splitlines()[1].removeprefix("exit "))
        if name in WARNINGS:
            assert code == 0 and "\nwarning: " in text, text
            continue
        assert code in (1, 2, 3), f"{name} exited {code}:\n{text}"
        assert len(text.splitlines()) > 2, f"{name} failed without a word:\n{text}"
