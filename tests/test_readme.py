"""The README's five-minute tutorial, command by command, as a new user types it.

Commands are taken from the tutorial's ```sh blocks, in order, and run with bash in a fresh
folder and a fresh home. What a person does between them — leaving `opsrun watch` running
in a second terminal, waiting until `opsrun pending` shows the run, copying its id — the
test does by waiting for the same condition with a deadline.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.wait import wait_for

README = Path(__file__).resolve().parent.parent / "README.md"
SCRATCH = Path("/tmp/opsrun-tutorial")  # the folder the tutorial itself names
REFUSED = {"opsrun run tutorial/disk-usage.yaml -p threshold=lots": 2}


def section(text: str, heading: str) -> str:
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def commands(markdown: str) -> list[str]:
    """The shell commands of every ```sh block, a here-document kept with its command."""
    out: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", markdown, re.S):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            i += 1
            if not line.strip():
                continue
            heredoc = re.search(r"<<'?(\w+)'?", line)
            if heredoc:
                body = [line]
                while i < len(lines) and lines[i] != heredoc.group(1):
                    body.append(lines[i])
                    i += 1
                body.append(lines[i])
                i += 1
                line = "\n".join(body)
            out.append(line)
    return out


def test_the_tutorial_has_the_steps_this_test_knows() -> None:
    cmds = commands(section(README.read_text(), "Five-minute tutorial"))
    assert cmds[0] == "opsrun init tutorial"
    assert "opsrun watch --runbooks tutorial" in cmds
    assert any(c.startswith("opsrun approve RUN_ID") for c in cmds)
    assert cmds[-1] == "opsrun audit verify"


def test_fresh_machine_commands_are_the_two_ci_runs() -> None:
    text = section(README.read_text(), "Try it on a fresh machine")
    cmds = commands(text)
    assert len(cmds) == 2, cmds
    assert cmds[0].endswith(".venv/bin/opsrun run runbooks/hello.yaml -p name=Ada")
    ci = (README.parent / ".ci" / "run").read_text()
    assert cmds[1] in ci, "the README's test command must be what .ci/run runs"


@pytest.mark.slow
def test_tutorial_verbatim(tmp_path: Path) -> None:
    shutil.rmtree(SCRATCH, ignore_errors=True)
    work = tmp_path / "checkout"
    work.mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OPSRUN_KILL_GRACE": "1s"}
    assert shutil.which("opsrun", path=env["PATH"]), "opsrun must be installed beside python"

    def sh(cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=60, check=False)

    def json_of(cmd: str) -> dict:
        done = sh(cmd)
        return json.loads(done.stdout) if done.returncode == 0 and done.stdout else {}

    service: subprocess.Popen[str] | None = None
    run_id = ""
    try:
        for cmd in commands(section(README.read_text(), "Five-minute tutorial")):
            if cmd.startswith("opsrun watch"):
                service = subprocess.Popen(["bash", "-c", f"exec {cmd}"], cwd=work, env=env,
                                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True)
                wait_for(lambda: json_of("opsrun status --json").get("running"), 20,
                         message="opsrun watch did not come up")
                continue
            if cmd == "opsrun pending":
                pending = wait_for(lambda: json_of("opsrun pending --json").get("pending"), 20,
                                   message="the emitted event's run never waited")
                run_id = pending[0]["run_id"][:8]
            if "RUN_ID" in cmd:
                assert run_id, "RUN_ID is used before `opsrun pending` showed one"
                cmd = cmd.replace("RUN_ID", run_id)
            if cmd.startswith("opsrun logs ") and run_id:
                wait_for(lambda: json_of("opsrun runs --json --limit 1")["runs"][0]["state"]
                         == "succeeded", 20, message="the approved run did not finish")
            done = sh(cmd)
            expected = REFUSED.get(cmd, 0)
            assert done.returncode == expected, f"$ {cmd}\n{done.stdout}{done.stderr}"
            assert "Traceback" not in done.stdout + done.stderr, cmd
            if cmd.startswith("ls /tmp/opsrun-tutorial"):
                assert done.stdout == "", "the approved cleanup should have deleted the files"
            if cmd.startswith("opsrun audit show"):
                assert "tutorial: old logs" in done.stdout
        assert service is not None, "the tutorial starts the service"
        service.send_signal(signal.SIGINT)  # "Stop the service with Ctrl-C"
        out, _ = service.communicate(timeout=30)
        assert service.returncode in (0, 130), out
        assert "Traceback" not in out
    finally:
        if service and service.poll() is None:
            service.kill()
            service.wait()
        shutil.rmtree(SCRATCH, ignore_errors=True)
