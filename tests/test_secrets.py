"""Secrets: where they come from, and that they never show."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from opsrun import secrets
from opsrun.errors import UsageError
from tests.helpers.cli import opsrun

SECRET = "hunter2-s3cr3t-value"


def test_from_environ_and_file_precedence(tmp_path: Path) -> None:
    f = tmp_path / "s.env"
    f.write_text("# comment\nDB_PASSWORD=from-file\nexport TOKEN='quoted value'\n")
    f.chmod(0o600)
    found = secrets.load(f, {"OPSRUN_SECRET_DB_PASSWORD": "from-env", "OTHER": "x"})
    assert found == {"DB_PASSWORD": "from-env", "TOKEN": "quoted value"}


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_file_readable_by_others_refused(tmp_path: Path, mode: int) -> None:
    f = tmp_path / "s.env"
    f.write_text("A=b\n")
    f.chmod(mode)
    with pytest.raises(UsageError, match=rf"can be read by others \(mode {mode:04o}\); run `chmod 600"):
        secrets.from_file(f)


def test_bad_line_named(tmp_path: Path) -> None:
    f = tmp_path / "s.env"
    f.write_text("GOOD=1\nthis is not a secret\n")
    f.chmod(0o600)
    with pytest.raises(UsageError, match=r"s.env:2: expected NAME=value"):
        secrets.from_file(f)


def test_masker_and_stream_split_anywhere() -> None:
    m = secrets.Masker({"a": SECRET, "short": "ab"})
    assert m(f"x{SECRET}y ab") == "x***y ab"  # two-letter values are not masked
    text = f"before {SECRET} middle {SECRET}{SECRET} end"
    for cut in range(1, len(text)):
        for second in (cut, min(len(text), cut + 3)):
            sm = m.stream()
            out = sm.feed(text[:cut]) + sm.feed(text[cut:second]) + sm.feed(text[second:])
            out += sm.flush()
            assert out == "before *** middle ****** end", (cut, second)


def test_overlapping_secrets_longest_wins() -> None:
    m = secrets.Masker(["abcdef", "abc"])
    assert m("xabcdefx abcx") == "x***x ***x"


def test_secret_masked_everywhere(tmp_path: Path) -> None:
    """Terminal, --json result, stored output, outputs, audit log — and not in the command line."""
    rb = tmp_path / "s.yaml"
    rb.write_text(
        "steps:\n"
        "  - id: use\n"
        "    run: |\n"
        "      echo \"token=${{ secrets.TOKEN }}\"\n"
        "      printf '%s' \"${{ secrets.TOKEN }}\" | fold -w 3\n"  # split across lines
        "      echo \"t=${{ secrets.TOKEN }}\" >> \"$OPSRUN_OUTPUT\"\n"
        "      echo \"${{ secrets.TOKEN }}\" >&2\n"
        "      cat /proc/$$/cmdline | tr '\\0' ' '\n")
    env = {"OPSRUN_STATE_DIR": str(tmp_path / "state"), "OPSRUN_SECRET_TOKEN": SECRET}
    for args in ([], ["--json"]):
        r = opsrun("run", str(rb), *args, env=env)
        assert r.returncode == 0, r.stderr
        assert SECRET not in r.stdout + r.stderr
    assert "token=***" in opsrun("run", str(rb), env=env).stdout
    doc = json.loads(opsrun("run", str(rb), "--json", env=env).stdout)
    step = doc["steps"][0]
    assert step["outputs"] == {"t": "***"} and "***" in step["stderr"]
    audit = (tmp_path / "state" / "audit.jsonl").read_text()
    assert SECRET not in audit and "***" in audit
    logs = opsrun("logs", doc["run"]["id"], env=env)
    assert SECRET not in logs.stdout and "token=***" in logs.stdout
    db = (tmp_path / "state" / "state.db").read_bytes()
    wal = tmp_path / "state" / "state.db-wal"
    stored = db + (wal.read_bytes() if wal.exists() else b"")
    assert SECRET.encode() not in stored


def test_secrets_not_passed_unless_asked(tmp_path: Path) -> None:
    rb = tmp_path / "n.yaml"
    rb.write_text("steps:\n  - run: env\n")
    r = opsrun("run", str(rb), "--json", env={"OPSRUN_STATE_DIR": str(tmp_path / "state"),
                                              "OPSRUN_SECRET_TOKEN": SECRET})
    assert "OPSRUN_SECRET_TOKEN" not in json.loads(r.stdout)["steps"][0]["stdout"]


def test_missing_secret_is_a_clear_error(tmp_path: Path) -> None:
    rb = tmp_path / "m.yaml"
    rb.write_text("steps:\n  - run: echo ${{ secrets.NOPE }}\n")
    r = opsrun("run", str(rb), env={"OPSRUN_STATE_DIR": str(tmp_path / "state")})
    assert r.returncode == 1
    assert "the secret 'NOPE' is not set; give it as OPSRUN_SECRET_NOPE=" in r.stdout
