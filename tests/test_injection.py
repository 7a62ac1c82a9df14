"""Hostile values from events and params reach commands as data, never as shell syntax."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.cli import opsrun

HOSTILE = [
    "; touch {canary}",
    "$(touch {canary})",
    "`touch {canary}`",
    "x && touch {canary}",
    "x || touch {canary}",
    "x | tee {canary}",
    "x > {canary}",
    "\ntouch {canary}\n",
    "'; touch {canary}; '",
    '"; touch {canary}; "',
    "${IFS}touch${IFS}{canary}",
    "$(touch${IFS}{canary})",
    "*",
    "/etc/*",
    "-rf",
    "--help",
    "-e touch {canary}",
    "\\; touch {canary}",
    "$'\\x3b' touch {canary}",
    "＄(touch {canary})",  # fullwidth dollar: a look-alike
    "x；touch {canary}",  # fullwidth semicolon
    "a\rtouch {canary}",
    "{{ 7*7 }} ${{ 7*7 }}",
    "EOF\ntouch {canary}\nEOF",
    "\x1b[2J\x1b]0;pwned\x07",
    "x" * 5000 + "; touch {canary}",
]

RUNBOOK = """\
params:
  p: {type: string}
steps:
  - id: unquoted
    run: printf '%s' ${{ event.v }} > {out}/unquoted-event
  - id: dquoted
    run: |
      printf '%s' "value: ${{ params.p }}" > {out}/dquoted-param
  - id: squoted
    run: |
      printf '%s' 'value: ${{ event.v }}' > {out}/squoted-event
  - id: heredoc
    run: |
      cat > {out}/heredoc-param <<EOF
      ${{ params.p }}
      EOF
  - id: subst
    run: printf '%s' "$(printf '%s' ${{ params.p }})" > {out}/subst-param
  - id: env
    env:
      V: ${{ event.v }}
    run: printf '%s' "$V" > {out}/env-event
  - id: eventvar
    run: printf '%s' "$OPSRUN_EVENT_V" > {out}/eventvar-event
"""


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_value_is_data(tmp_path: Path, template: str) -> None:
    canary = tmp_path / "canary"
    out = tmp_path / "out"
    out.mkdir()
    value = template.replace("{canary}", str(canary))
    rb = tmp_path / "inj.yaml"
    rb.write_text(RUNBOOK.replace("{out}", str(out)))
    env = {"OPSRUN_STATE_DIR": str(tmp_path / "state")}
    r = opsrun("run", str(rb), "-p", f"p={value}", "--event", json.dumps({"v": value}),
               env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not canary.exists(), "an injected command ran"
    def got(name: str) -> str:
        return (out / name).read_bytes().decode()

    assert got("unquoted-event") == value
    assert got("dquoted-param") == f"value: {value}"
    assert got("squoted-event") == f"value: {value}"
    assert got("heredoc-param") == value + "\n"
    assert got("subst-param") == value.rstrip("\n")
    assert got("env-event") == value
    assert got("eventvar-event") == value
    assert "\x1b" not in r.stdout  # terminal escapes are shown, not obeyed


def test_hostile_file_name_removed_alone(tmp_path: Path) -> None:
    """DESIGN: `rm ${{ event.path }}` with a file named `x; rm -rf ~` removes only that file."""
    home = tmp_path / "home"
    home.mkdir()
    victim = home / "keep-me"
    victim.write_text("precious")
    odd = tmp_path / "x; rm -rf ~"
    odd.write_text("")
    rb = tmp_path / "rm.yaml"
    rb.write_text("steps:\n  - run: rm ${{ event.path }}\n")
    r = opsrun("run", str(rb), "--event", json.dumps({"path": str(odd)}),
               env={"OPSRUN_STATE_DIR": str(tmp_path / "state"), "HOME": str(home)})
    assert r.returncode == 0, r.stderr
    assert not odd.exists()
    assert victim.read_text() == "precious"


def test_nul_in_value_refused(tmp_path: Path) -> None:
    rb = tmp_path / "nul.yaml"
    rb.write_text("steps:\n  - run: echo ${{ event.v }}\n")
    r = opsrun("run", str(rb), "--event", '{"v": "a\\u0000b"}',
               env={"OPSRUN_STATE_DIR": str(tmp_path / "state")})
    assert r.returncode == 1
    assert "contains a NUL byte" in r.stdout
