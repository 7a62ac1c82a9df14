"""Hostile file names, log lines, JSON values and params, through every source and view.

What must hold, checked from the outside on the real program:
- nothing in the data is ever executed: the canary files never appear;
- each value reaches the step as one word of data, exactly as it was;
- nothing opsrun prints obeys a terminal escape from the data: run output, `opsrun runs`,
  `logs`, `pending`, `audit show`, the service's log, `dispatch --dry-run`, validate
  messages and error messages show ESC, CSI (0x9b), BEL, CR, backspace and the bidi
  overrides as visible escapes (`\\x1b`), never raw.

A step's own output is untrusted too (it often echoes what the event carried): it is shown
escaped everywhere, also in the live view on a terminal (see opsrun/output.py).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.cli import no_traceback, opsrun
from tests.helpers.files import write
from tests.helpers.service import Service
from tests.helpers.wait import wait_for

CANARY = "pwned-canary"
# Raw bytes that would drive a terminal (or reorder what it shows) if printed as they are.
RAW = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u2028\u2029]")


def hostile(canary: Path) -> list[str]:
    """Values an attacker would send; none contains "/" so each one is also a file name."""
    return [
        f"; touch {CANARY}", f"$(touch {CANARY})", f"`touch {CANARY}`",
        f"x && touch {CANARY} #", f"a\ntouch {CANARY}", f"'; touch {CANARY}; '",
        "\x1b[2J\x1b[H wiped", "\x1b]0;pwned title\x07", "\x1b[31mred\x1b[0m", "\x9b2J csi",
        "cr\rover", "bs\b\b\bx", "\u202eevil\u202c", "${{ 7*7 }}", "{{ 7*7 }}", "-rf", "*",
        "[bold]markup[blink]", "é ✓ 𝕏",
    ]


def assert_inert(text: str, where: str) -> None:
    m = RAW.search(text)
    assert m is None, f"{where}: raw {m.group()!r} in …{text[max(0, m.start() - 80):m.end() + 80]!r}"


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    rbdir = tmp_path / "runbooks"
    rbdir.mkdir()
    drop, work, out = tmp_path / "drop", tmp_path / "work", tmp_path / "out"
    for folder in (drop, work, out):
        folder.mkdir()
    log = tmp_path / "app.log"
    log.write_text("")
    write(rbdir, "files.yaml", f"""\
        on:
          - file: {{paths: ["{drop}/*"], events: [added]}}
        concurrency: {{policy: parallel}}
        steps:
          - workdir: {work}
            run: |
              printf 'v=%s\\n' ${{{{ event.path }}}} | tee {out}/files.$OPSRUN_RUN_ID
              ls -- ${{{{ event.path }}}} > /dev/null
        """)
    write(rbdir, "logs.yaml", f"""\
        on:
          - log: {{path: {log}, match: '^HOSTILE (?P<msg>.*)$'}}
        concurrency: {{policy: parallel}}
        steps:
          - workdir: {work}
            run: printf 'v=%s\\n' "${{{{ event.msg }}}}" | tee {out}/logs.$OPSRUN_RUN_ID
        """)
    write(rbdir, "events.yaml", f"""\
        on:
          - event: {{where: {{kind: hostile}}}}
        concurrency: {{policy: parallel}}
        steps:
          - workdir: {work}
            name: show the value
            run: printf 'v=%s\\n' '${{{{ event.v }}}}' | tee {out}/events.$OPSRUN_RUN_ID
        """)
    write(rbdir, "ask.yaml", f"""\
        on:
          - event: {{where: {{kind: ask}}}}
        steps:
          - id: ask
            confirm: "Act on ${{{{ event.v }}}}?"
          - workdir: {work}
            run: printf '%s\\n' ${{{{ event.v }}}}
        """)
    svc = Service(tmp_path, rbdir, "--log-format", "plain", stdin=True)
    svc.drop, svc.work, svc.out, svc.applog = drop, work, out, log  # type: ignore[attr-defined]
    try:
        yield svc
    finally:
        svc.close()


def test_every_source_takes_hostile_data_as_data(tmp_path: Path, service: Service) -> None:
    svc = service
    values = hostile(tmp_path / CANARY)
    svc.start()
    for v in values:
        (svc.drop / v).write_text("x")  # type: ignore[attr-defined]
    one_line = [v.replace("\n", " ") for v in values]  # a log line holds no newline
    with svc.applog.open("a") as f:  # type: ignore[attr-defined]
        f.write("".join(f"HOSTILE {v}\n" for v in one_line))
    emitted = "".join(json.dumps({"kind": "hostile", "v": v, "id": v}) + "\n" for v in values)
    r = svc.cli("emit", "-", input=emitted)
    assert r.returncode == 0, r.stderr
    svc.send_stdin("".join(json.dumps({"kind": "hostile", "v": v, "via": "stdin"}) + "\n"
                           for v in values) + "\x1b[2J not json\n")
    assert svc.cli("emit", json.dumps({"kind": "ask", "v": "".join(values)})).returncode == 0

    total = 4 * len(values)
    out: Path = svc.out  # type: ignore[attr-defined]
    wait_for(lambda: len(list(out.iterdir())) >= total, timeout=60,
             message=lambda: svc.cli("runs").stdout + svc.log())
    wait_for(lambda: len([r for r in svc.runs() if r["state"] == "succeeded"]) >= total,
             timeout=30, interval=0.2, message=lambda: svc.cli("runs").stdout + svc.log())
    assert not (svc.work / CANARY).exists()  # type: ignore[attr-defined]
    assert not (tmp_path / CANARY).exists()
    runs = svc.runs()
    assert [r["state"] for r in runs].count("waiting") == 1, svc.cli("runs").stdout
    got: dict[str, list[str]] = {"files": [], "logs": [], "events": []}
    for f in out.iterdir():
        got[f.name.split(".")[0]].append(f.read_bytes().decode())
    drop = str(svc.drop)  # type: ignore[attr-defined]
    assert sorted(got["files"]) == sorted(f"v={drop}/{v}\n" for v in values)
    assert sorted(got["logs"]) == sorted(f"v={v}\n" for v in one_line)
    assert sorted(got["events"]) == sorted(2 * [f"v={v}\n" for v in values])

    # Every view of what happened shows the data without obeying it.
    assert_inert(svc.cli("runs").stdout, "opsrun runs")
    pending = svc.cli("pending")
    assert_inert(pending.stdout, "opsrun pending")
    assert "\\x1b[2J" in pending.stdout
    for name in ("files", "logs", "events"):  # one run of each: the rest print alike
        run = next(r for r in runs if r["runbook"] == name)
        logs = svc.cli("logs", run["id"])
        assert logs.returncode == 0, logs.stderr
        assert_inert(logs.stdout + logs.stderr, f"opsrun logs of a {name} run")
    show = svc.cli("audit", "show")
    assert_inert(show.stdout + show.stderr, "opsrun audit show")
    assert "\\x1b" in show.stdout
    tail = svc.cli("audit", "tail", "-n", "50")
    assert_inert(tail.stdout, "opsrun audit tail")
    waiting = json.loads(svc.cli("pending", "--json").stdout)["pending"][0]["run_id"]
    assert svc.cli("deny", waiting).returncode == 0
    wait_for(lambda: any(r["id"] == waiting and r["state"] == "denied" for r in svc.runs()),
             timeout=20)
    assert svc.stop() == 0
    assert not (svc.work / CANARY).exists()  # type: ignore[attr-defined]
    assert_inert(svc.log(), "the service's log")
    assert "event rejected" in svc.log()
    assert svc.cli("audit", "verify").returncode == 0


def test_run_output_params_and_errors_are_shown_not_obeyed(tmp_path: Path) -> None:
    canary = tmp_path / CANARY
    rb = write(tmp_path, "p.yaml", """\
        params:
          p: {type: string}
          n: {type: int, default: 1}
        steps:
          - id: echo
            run: |
              printf '%s\\n' ${{ params.p }}
              printf '%s\\n' ${{ params.p }} >&2
          - id: fail
            run: printf '%s' ${{ event.v | int }}
        """)
    env = {"OPSRUN_STATE_DIR": str(tmp_path / "state")}
    joined = "".join(hostile(canary))
    r = opsrun("run", str(rb), "-p", f"p={joined}", "--event", json.dumps({"v": joined}),
               env=env, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert not canary.exists()
    assert_inert(r.stdout + r.stderr, "opsrun run")
    lines = r.stdout.splitlines()
    assert any(x.startswith("echo | ") and "\\x1b[2J" in x for x in lines), r.stdout
    assert any(x.startswith("echo ! ") and "\\x9b2J" in x for x in lines), r.stdout
    assert "is not a whole number" in r.stdout
    # The same text where the user's own input is refused.
    r = opsrun("run", str(rb), "-p", f"p={joined}", "-p", f"n={joined}", env=env)
    assert r.returncode == 2 and no_traceback(r)
    assert_inert(r.stdout + r.stderr, "a refused param")
    r = opsrun("run", str(rb), "-p", f"{joined}=1", env=env)
    assert r.returncode == 2
    assert_inert(r.stdout + r.stderr, "an unknown param")
    r = opsrun("run", str(rb), "-p", "p=x", "--event", f"@{tmp_path}/\x1b[2J-no-such-file",
               env=env)
    assert r.returncode == 2
    assert_inert(r.stdout + r.stderr, "an --event file that cannot be read")
    r = opsrun("run", str(rb), "--dry-run", "-p", f"p={joined}", "--event",
               json.dumps({"v": "1"}), env=env)
    assert r.returncode == 0, r.stderr
    assert_inert(r.stdout + r.stderr, "opsrun run --dry-run")
    assert not canary.exists()


def test_dispatch_dry_run_and_rejections(tmp_path: Path) -> None:
    rbdir = tmp_path / "runbooks"
    rbdir.mkdir()
    write(rbdir, "e.yaml", """\
        on:
          - event: {where: {kind: hostile}}
        steps:
          - run: printf '%s' ${{ event.v }}
        """)
    values = hostile(tmp_path / CANARY)
    lines = [json.dumps({"kind": "hostile", "id": v, "v": v}) for v in values]
    lines += ["\x1b[2J\x9b not json", '{"\x1b[2J": ' + "[" * 70 + "]" * 70 + "}"]
    r = opsrun("dispatch", "--dry-run", "--runbooks", str(rbdir),
               input="\n".join(lines) + "\n",
               env={"OPSRUN_STATE_DIR": str(tmp_path / "state")})
    assert r.returncode == 2, r.stderr
    assert_inert(r.stdout + r.stderr, "opsrun dispatch --dry-run")
    assert r.stdout.count(": e\n") == len(values)
    assert "line 20: not JSON" in r.stderr and "line 21: nested" in r.stderr
    r = opsrun("dispatch", "--runbooks", str(rbdir), input="\n".join(lines) + "\n",
               env={"OPSRUN_STATE_DIR": str(tmp_path / "state")}, cwd=tmp_path)
    assert r.returncode == 2
    assert not (tmp_path / CANARY).exists()
    assert_inert(r.stdout + r.stderr, "opsrun dispatch")


def test_validate_quotes_yaml_content_escaped(tmp_path: Path) -> None:
    rb = write(tmp_path, "bad.yaml", r"""
        name: bad
        "\e[2Jkey": 1
        on:
          - log: {path: /var/log/x, match: "(\e]0;x\a"}
        steps:
          - id: "\e[31mred"
            run: echo "${{ event.nope }}\e[2J"
          - run: echo hi
            timout: "\x9b5m"
        """)
    for args in ([], ["--format", "github"]):
        r = opsrun("validate", str(rb), *args)
        assert r.returncode == 2, r.stdout + r.stderr
        assert_inert(r.stdout + r.stderr, f"opsrun validate {' '.join(args)}")
        assert "\\x1b[2Jkey" in r.stdout
    r = opsrun("run", str(rb), env={"OPSRUN_STATE_DIR": str(tmp_path / "state")})
    assert r.returncode == 2
    assert_inert(r.stdout + r.stderr, "opsrun run of an invalid runbook")


def test_odd_runbook_file_names_are_shown_escaped(tmp_path: Path) -> None:
    """A runbook's name defaults to its file's name, which may hold anything but /."""
    rbdir = tmp_path / "runbooks"
    rbdir.mkdir()
    odd = "odd\x1b[2J[bold]name"
    write(rbdir, f"{odd}.yaml", "steps:\n  - run: echo ok\n")
    env = {"OPSRUN_STATE_DIR": str(tmp_path / "state")}
    for args in (["list"], ["validate", str(rbdir)]):
        r = opsrun(*args, "--runbooks", str(rbdir)) if args == ["list"] else opsrun(*args)
        assert_inert(r.stdout + r.stderr, " ".join(args))
    r = opsrun("run", str(rbdir / f"{odd}.yaml"), env=env)
    assert_inert(r.stdout + r.stderr, "opsrun run of an odd file name")
    for args in (["runs"], ["logs"], ["audit", "show"]):
        r = opsrun(*args, env=env)
        assert_inert(r.stdout + r.stderr, " ".join(args))


def test_live_view_on_a_terminal_escapes_step_output(tmp_path: Path) -> None:
    """On a real terminal too: the rich live view shows escapes, it does not obey them."""
    import pty
    import select
    import subprocess
    import sys

    rb = write(tmp_path, "tty[red]x\x1b[2J.yaml", r"""
        steps:
          - name: "step \e[2J[blink]name"
            run: printf '\033[2J\033]0;title\007[bold]markup\n\302\233H\n'
        """)
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env.update(TERM="xterm-256color", COLUMNS="120",
               OPSRUN_STATE_DIR=str(tmp_path / "state"))
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "opsrun", "run", str(rb)], env=env,
                            stdin=follower, stdout=follower, stderr=follower, cwd=tmp_path)
    os.close(follower)
    out = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 30)
        if not ready:
            break
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        out += data
    os.close(leader)
    assert proc.wait(timeout=30) == 0, out
    text = out.decode(errors="replace")
    # rich's own styling is there; what came from the step or the runbook is escaped.
    assert "\\x1b[2J" in text and "[bold]markup" in text and "\\x9bH" in text
    assert "\x1b[2J" not in text and "\x1b]0;" not in text and "\x07" not in text
    assert "\x9b" not in text


def test_every_control_and_format_character_is_escaped() -> None:
    """The one escaper covers every character of the categories that act instead of
    showing (Cc, Cf, Zl, Zp, Cs) in this Python's Unicode, and nothing printable."""
    import sys
    import unicodedata

    from opsrun.terminal_text import safe

    acting = [chr(c) for c in range(sys.maxunicode + 1)
              if unicodedata.category(chr(c)) in ("Cc", "Cf", "Zl", "Zp", "Cs")]
    missed = [f"U+{ord(c):04X}" for c in acting if c not in "\t\n" and safe(c) == c]
    assert not missed, f"add these to opsrun/terminal_text.py: {missed}"
    assert safe("tab\tnew\nline", keep_newlines=False) == "tab\\tnew\\nline"
    assert safe("émoji 👍 ÄÖ ﬁ") == "émoji 👍 ÄÖ ﬁ"
