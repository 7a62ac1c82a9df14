"""SSH steps against a real OpenSSH server on 127.0.0.1, through the real `opsrun` CLI:
host keys, log-in, the step's environment and workdir, outputs, exit codes, the audit log.

The server is the session's `sshd` fixture (tests/helpers/sshd.py); fan-out, timeouts and
cancelling are in tests/test_ssh_fanout.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.cli import no_traceback, opsrun
from tests.helpers.sshd import Sshd


@dataclass
class Ws:
    root: Path
    rb: Path
    state: Path

    def runbook(self, text: str, name: str = "t") -> Path:
        path = self.rb / f"{name}.yaml"
        path.write_text(textwrap.dedent(text))
        return path

    def run(self, *args: str, env: dict[str, str] | None = None
            ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
        r = opsrun("run", "t", "-r", str(self.rb), "--state-dir", str(self.state), "--json",
                   *args, cwd=self.root, env=env)
        assert no_traceback(r), r.stderr
        return r, json.loads(r.stdout) if r.stdout.startswith("{") else {}

    def audit(self, kind: str | None = None) -> list[dict[str, Any]]:
        lines = (self.state / "audit.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        return [r for r in records if kind is None or r["kind"] == kind]


@pytest.fixture
def ws(tmp_path: Path, sshd: Sshd) -> Ws:
    rb = tmp_path / "rb"
    rb.mkdir()
    (rb / "inventory.yaml").write_text(sshd.inventory(["local", "other"]))
    return Ws(tmp_path, rb, tmp_path / "state")


def step(doc: dict[str, Any], sid: str) -> dict[str, Any]:
    return next(s for s in doc["steps"] if s["id"] == sid)


def key_fingerprint(pub: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-l", "-f", str(pub)], capture_output=True, text=True,
                         check=True).stdout
    return out.split()[1]


UPTIME = """\
    steps:
      - id: up
        host: local
        run: echo "up on $OPSRUN_HOST"
    """


# ── host keys ───────────────────────────────────────────────────────────────

def test_an_unknown_host_key_is_refused_and_says_what_to_do(ws: Ws, sshd: Sshd) -> None:
    ws.runbook(UPTIME)
    r, doc = ws.run()
    assert r.returncode == 1
    error = step(doc, "up")["error"]
    fp = key_fingerprint(sshd.folder / "host_key.pub")
    assert error == (
        f"local: the host key of 127.0.0.1:{sshd.port} is not known (ssh-ed25519 {fp}); check "
        "that fingerprint with the host's owner, then either ssh -p "
        f"{sshd.port} {sshd.user}@127.0.0.1 once and accept it, or add it with ssh-keyscan "
        f"-p {sshd.port} 127.0.0.1 >> ~/.ssh/known_hosts, or run again with "
        f"--accept-new-hosts (opsrun keeps it in {ws.state}/known_hosts)")
    assert step(doc, "up")["hosts"]["local"]["outcome"] == "failure"
    assert not (ws.state / "known_hosts").exists()


def test_accept_new_hosts_keeps_the_key_and_audits_its_fingerprint(ws: Ws, sshd: Sshd) -> None:
    ws.runbook(UPTIME)
    r, doc = ws.run("--accept-new-hosts")
    assert r.returncode == 0, doc
    assert (ws.state / "known_hosts").read_text() == sshd.host_key_line + "\n"
    assert (ws.state / "known_hosts").stat().st_mode & 0o777 == 0o600
    fp = key_fingerprint(sshd.folder / "host_key.pub")
    (learned,) = ws.audit("host_key.learned")
    assert learned["run_id"] == doc["run"]["id"]
    assert {k: learned[k] for k in ("host_name", "address", "key_type", "fingerprint",
                                    "known_hosts_name", "file")} == {
        "host_name": "local", "address": f"{sshd.user}@127.0.0.1:{sshd.port}",
        "key_type": "ssh-ed25519", "fingerprint": fp,
        "known_hosts_name": f"[127.0.0.1]:{sshd.port}", "file": str(ws.state / "known_hosts")}
    assert step(doc, "up")["hosts"]["local"]["host_key"] == "learned"
    # Known from now on, without the flag.
    r, doc = ws.run()
    assert r.returncode == 0
    assert step(doc, "up")["hosts"]["local"]["host_key"] == "known"
    assert len(ws.audit("host_key.learned")) == 1


def test_a_changed_host_key_is_refused_even_with_accept_new_hosts(ws: Ws, sshd: Sshd) -> None:
    known = Path.home() / ".ssh" / "known_hosts"
    known.parent.mkdir(mode=0o700)
    other_key = (sshd.folder / "client_key.pub").read_text().split()[1]  # not the host's
    known.write_text(f"[127.0.0.1]:{sshd.port} ssh-ed25519 {other_key}\n")
    ws.runbook(UPTIME)
    r, doc = ws.run("--accept-new-hosts")
    assert r.returncode == 1
    error = step(doc, "up")["error"]
    assert error.startswith(f"local: the host key of 127.0.0.1:{sshd.port} has CHANGED: it is "
                            f"now ssh-ed25519 {key_fingerprint(sshd.folder / 'host_key.pub')}, "
                            f"and ssh-ed25519 {key_fingerprint(sshd.folder / 'client_key.pub')}"
                            " is the one known. This may be an attack")
    assert (f"remove the old one with ssh-keygen -R '[127.0.0.1]:{sshd.port}' -f {known}, "
            "then connect again (--accept-new-hosts never replaces a known key)") in error
    assert not (ws.state / "known_hosts").exists()
    assert ws.audit("host_key.learned") == []


# ── log-in ──────────────────────────────────────────────────────────────────

def test_a_refused_key_and_a_missing_key_file_fail_their_host_only(ws: Ws, sshd: Sshd) -> None:
    sshd.trust()
    stranger = ws.root / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
                   check=True)
    (ws.rb / "inventory.yaml").write_text(
        sshd.inventory(["local"])
        + f"  stranger: {{hostname: 127.0.0.1, port: {sshd.port}, user: {sshd.user}, "
          f"key: {stranger}}}\n"
        + f"  lost: {{hostname: 127.0.0.1, port: {sshd.port}, key: {ws.root}/no-such-key}}\n")
    ws.runbook("""\
        steps:
          - id: all
            hosts: [local, stranger, lost]
            parallel: 3
            run: echo in
        """)
    r, doc = ws.run()
    assert r.returncode == 1
    hosts = step(doc, "all")["hosts"]
    assert hosts["local"]["outcome"] == "success" and hosts["local"]["stdout"] == "in\n"
    assert hosts["stranger"]["error"].startswith(
        f"stranger: {sshd.user}@127.0.0.1:{sshd.port} refused the log-in as {sshd.user!r} "
        f"(tried {stranger}, the SSH agent, ~/.ssh/id_*); add your public key")
    assert hosts["lost"]["error"] == (
        f"lost: the key file {ws.root}/no-such-key named in the inventory does not exist; fix "
        "`key:` or remove it to use the SSH agent and your usual keys")
    assert step(doc, "all")["error"].startswith("2 of 3 hosts failed: stranger (")


def test_a_name_only_in_ssh_config_is_reached_with_its_entry(ws: Ws, sshd: Sshd) -> None:
    sshd.trust()
    (ws.rb / "inventory.yaml").unlink()
    config = Path.home() / ".ssh" / "config"
    config.write_text(f"Host via-config\n  HostName {sshd.host}\n  Port {sshd.port}\n"
                      f"  User {sshd.user}\n  IdentityFile {sshd.client_key}\n")
    ws.runbook("steps:\n  - {id: up, host: via-config, run: echo \"on $OPSRUN_HOST\"}\n")
    r, doc = ws.run()
    assert r.returncode == 0, doc
    up = step(doc, "up")
    assert up["stdout"] == "on via-config\n"
    assert up["hosts"]["via-config"]["address"] == f"{sshd.user}@127.0.0.1:{sshd.port}"


# ── what the command gets, and what comes back ──────────────────────────────

def test_env_workdir_outputs_and_exit_codes_reach_and_come_back(ws: Ws, sshd: Sshd) -> None:
    sshd.trust()
    canary = ws.root / "canary"
    workdir = ws.root / "work dir"
    workdir.mkdir()
    hostile = f"x'; touch {canary}; '"
    ws.runbook(f"""\
        params:
          hostile: {{default: "{hostile}"}}
        env:
          TOP: "$(touch {canary}) `touch {canary}`"
        steps:
          - id: env
            host: local
            env:
              HOSTILE: ${{{{ params.hostile }}}}
              MULTI: "line one\\nline 'two' \\"3\\" $HOME"
            run: |
              printf '[%s]' "$HOSTILE" "$MULTI" "$TOP" ${{{{ params.hostile }}}} "$OPSRUN_HOST"
              printf 'flag=%s\\n' "$HOSTILE" >> "$OPSRUN_OUTPUT"
              printf 'more<<END\\nsecond\\nline\\nEND\\n' >> "$OPSRUN_OUTPUT"
          - id: where
            host: local
            workdir: {workdir}
            run: pwd; echo oops >&2; exit 3
            continue_on_error: true
          - id: after
            if: steps.where.hosts.local.exit_code == 3 and steps.env.hosts.local.outcome == 'success'
            run: echo "${{{{ steps.env.outputs.flag }}}}|${{{{ steps.env.outputs.more }}}}|${{{{ steps.where.exit_code }}}}"
        """)
    r, doc = ws.run()
    assert r.returncode == 0, doc
    env = step(doc, "env")
    assert env["stdout"] == (f"[{hostile}][line one\nline 'two' \"3\" $HOME]"
                             f"[$(touch {canary}) `touch {canary}`][{hostile}][local]")
    assert env["outputs"] == {"flag": hostile, "more": "second\nline"}
    assert env["hosts"]["local"]["outputs"] == env["outputs"]
    assert not canary.exists()
    where = step(doc, "where")
    assert (where["outcome"], where["exit_code"], where["stdout"], where["stderr"]) == (
        "failure", 3, f"{workdir}\n", "oops\n")
    assert where["hosts"]["local"]["exit_code"] == 3
    assert where["error"] is None
    assert step(doc, "after")["stdout"] == f"{hostile}|second\nline|3\n"
    # Nothing of the step is left in the remote temp folder.
    assert not list(Path("/tmp").glob(f"opsrun-*{doc['run']['id']}*"))


def test_a_missing_workdir_fails_the_host_with_the_shells_word(ws: Ws, sshd: Sshd) -> None:
    sshd.trust()
    ws.runbook(f"""\
        steps:
          - id: cd
            host: local
            workdir: {ws.root}/nowhere
            run: echo never
        """)
    r, doc = ws.run()
    assert r.returncode == 1
    cd = step(doc, "cd")
    assert cd["exit_code"] == 1 and cd["stdout"] == ""
    assert f"{ws.root}/nowhere" in cd["stderr"]


def test_secrets_given_to_a_remote_command_are_masked_everywhere(ws: Ws, sshd: Sshd) -> None:
    sshd.trust()
    secret = "s3cr3t-value-42"
    ws.runbook("""\
        steps:
          - id: use
            host: local
            env: {TOKEN: "${{ secrets.TOKEN }}"}
            run: echo "token=$TOKEN"; echo "len=${#TOKEN}"
        """)
    r, doc = ws.run(env={"OPSRUN_SECRET_TOKEN": secret})
    assert r.returncode == 0, doc
    assert step(doc, "use")["stdout"] == f"token=***\nlen={len(secret)}\n"
    assert secret not in r.stdout + r.stderr
    assert secret not in (ws.state / "audit.jsonl").read_text()
    logs = opsrun("logs", "--json", "--state-dir", str(ws.state))
    assert "token=***" in logs.stdout and secret not in logs.stdout


# ── connections and the record ──────────────────────────────────────────────

def test_one_connection_per_host_per_run_reused_by_every_step(ws: Ws, sshd: Sshd) -> None:
    sshd.trust()
    ws.runbook("""\
        steps:
          - {id: a, host: local, run: 'echo ${SSH_CLIENT%% 22*}'}
          - {id: b, host: local, run: 'echo ${SSH_CLIENT%% 22*}'}
          - {id: c, hosts: [local, other], run: 'echo ${SSH_CLIENT%% 22*}'}
        """)
    before = sshd.log.count("Accepted publickey")
    r, doc = ws.run()
    assert r.returncode == 0, doc
    clients = {s["id"]: {n: h["stdout"] for n, h in s["hosts"].items()} for s in doc["steps"]}
    assert clients["a"]["local"] == clients["b"]["local"] == clients["c"]["local"]
    assert clients["c"]["other"] != clients["c"]["local"]  # its own connection
    assert sshd.log.count("Accepted publickey") - before == 2
    r, doc2 = ws.run()
    assert step(doc2, "a")["hosts"]["local"]["stdout"] != clients["a"]["local"]  # a new run


def test_the_audit_log_records_each_host(ws: Ws, sshd: Sshd) -> None:
    sshd.trust()
    ws.runbook("""\
        steps:
          - id: fleet
            hosts: ["group:test"]
            parallel: 2
            run: echo "on $OPSRUN_HOST"; test "$OPSRUN_HOST" = local
        """)
    r, doc = ws.run()
    assert r.returncode == 1
    (started,) = ws.audit("step.started")
    assert started["hosts"] == ["local", "other"]
    (finished,) = ws.audit("step.finished")
    fp = key_fingerprint(sshd.folder / "host_key.pub")
    assert finished["command"] == 'echo "on $OPSRUN_HOST"; test "$OPSRUN_HOST" = local'
    assert finished["error"] == "1 of 2 hosts failed: other (exit code 1)"
    for name, code in (("local", 0), ("other", 1)):
        host = finished["hosts"][name]
        assert host["address"] == f"{sshd.user}@127.0.0.1:{sshd.port}"
        assert (host["fingerprint"], host["exit_code"]) == (fp, code)
        assert host["outcome"] == ("success" if code == 0 else "failure")
        assert 0 < host["duration"] < 30 and host["stdout"] == f"on {name}\n"
    assert finished["stdout"] == "local: on local\nother: on other\n"


def test_dispatch_and_resume_take_the_ssh_options(ws: Ws, sshd: Sshd, tmp_path: Path) -> None:
    inventory = tmp_path / "elsewhere.yaml"
    inventory.write_text(sshd.inventory(["far"]))
    (ws.rb / "inventory.yaml").unlink()
    ws.runbook("""\
        on:
          - event: {where: {type: ping}}
        steps:
          - id: pong
            host: far
            run: echo pong
        """)
    r = opsrun("dispatch", "-r", str(ws.rb), "--state-dir", str(ws.state), "--inventory",
               str(inventory), "--accept-new-hosts", "--json", input='{"type": "ping"}\n')
    assert r.returncode == 0, r.stdout + r.stderr
    assert [run["state"] for run in json.loads(r.stdout)["runs"]] == ["succeeded"]
    assert len(ws.audit("host_key.learned")) == 1
    r = opsrun("resume", "01NOSUCHRUN", "--state-dir", str(ws.state), "--inventory",
               str(inventory), "--accept-new-hosts")
    assert r.returncode == 2 and "01NOSUCHRUN" in r.stderr and no_traceback(r)


def test_paramiko_is_imported_only_for_ssh_steps(tmp_path: Path) -> None:
    (tmp_path / "local.yaml").write_text("steps:\n  - run: echo hi\n")
    probe = ("import sys; from opsrun.cli import main; code = main(['run', 'local.yaml', "
             "'--state-dir', 'state']); print('paramiko' in sys.modules); sys.exit(code)")
    r = subprocess.run([os.sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "False"
