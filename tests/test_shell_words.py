"""Values in `run:` are data, never shell syntax: checked through a real `bash -c`.

Each script writes what the command received to a file; the test compares the exact bytes,
and checks that a canary file, which any successful injection would create, never appears.
The `display` form (values quoted inline, for people) must be shell that gives the same
result when bash runs it.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from opsrun import shell_words as sw
from opsrun.errors import ExpressionError
from opsrun.expressions import Expr

CANARY = "CANARY"

HOSTILE = [
    "; rm -rf /",
    "x; touch CANARY",
    "$(touch CANARY)",
    "`touch CANARY`",
    "a\ntouch CANARY\n",
    "line one\nline two",
    "\n",
    "it's",
    "' ; touch CANARY ; '",
    'say "hi"',
    '" ; touch CANARY ; "',
    "*",
    "/*/*",
    "-n",
    "--help",
    "${IFS}touch${IFS}CANARY",
    "$HOME $PATH $0 $1 $@ $$",
    "\\",
    "a\\",
    "\\n\\t",
    "!!",
    "~",
    "a b  c\t\td",
    "",
    " ",
    "EOF",
    "x\nEOF\ntouch CANARY\nEOF",
    "\tEOF\ntouch CANARY",
    "$((1+1))",
    "<(touch CANARY)",
    "> CANARY",
    "| touch CANARY",
    "&& touch CANARY",
    "}} ${{ x }} {{",
    "${OPSRUN_X_1}",
    "ｒｍ －ｒｆ ／；ｔｏｕｃｈ　ＣＡＮＡＲＹ",  # full-width look-alikes
    "rm\u00a0-rf\u2003/\u2028touch CANARY",  # no-break and em spaces, line separator
    "e\u0301te\u0301 ☃ 🚀",
    "\x1b[31mred\x1b[0m\r\x07",
]

# name → (script, what `out` must hold for a value v)
CONTEXTS = {
    "unquoted": ("printf '%s' ${{ v }} > out", lambda v: v),
    "assignment": ("x=${{ v }}; printf '%s' \"$x\" > out", lambda v: v),
    "two_in_one_word": ("printf '%s' ${{ v }}${{ v }} > out", lambda v: v + v),
    "double_quotes": ("printf '%s' \"<${{ v }}>\" > out", lambda v: f"<{v}>"),
    "single_quotes": ("printf '%s' '<${{ v }}>' > out", lambda v: f"<{v}>"),
    "heredoc": ("cat > out <<EOF\n<${{ v }}>\nEOF\n", lambda v: f"<{v}>\n"),
    "heredoc_line_start": ("cat > out <<EOF\n${{ v }}\nEOF\n", lambda v: f"{v}\n"),
    "heredoc_dash": ("cat > out <<-EOF\n\t<${{ v }}>\n\tEOF\n", lambda v: f"<{v}>\n"),
    "command_substitution": ("x=$(printf '%s.' ${{ v }}); printf '%s' \"${x%.}\" > out",
                             lambda v: v),
    "command_substitution_in_quotes": ("printf '%s' \"$(printf '%s.' \"<${{ v }}>\")\" > out",
                                       lambda v: f"<{v}>."),
    "heredoc_in_command_substitution": (
        "x=$(cat <<EOF\n<${{ v }}>\nEOF\n); printf '%s' \"$x\" > out", lambda v: f"<{v}>"),
    "if_block": ("if true; then\n  printf '%s' ${{ v }} > out\nfi", lambda v: v),
    "comment": ("printf ok > out # ${{ v }}", lambda v: "ok"),
    "comment_line": ("# about ${{ v }}\nprintf ok > out", lambda v: "ok"),
}


def bash(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    full = {"PATH": os.environ["PATH"], "HOME": str(cwd), "LC_ALL": "C.UTF-8", **env}
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=full, capture_output=True,
                          timeout=20, check=False)


def run_both(script_text: str, value: str, tmp_path: Path) -> tuple[bytes, bytes]:
    """Run the script form and the display form; return what each wrote to `out`."""
    plan = sw.plan(script_text)
    rendered = sw.render(plan, lambda e: value)
    results = []
    for form, script, env in (("script", rendered.script, rendered.env),
                              ("display", rendered.display, {})):
        work = tmp_path / form
        work.mkdir()
        r = bash(script, work, env)
        assert r.returncode == 0, (form, script, r.stderr)
        assert not (work / CANARY).exists(), f"{form} form ran injected code: {script!r}"
        assert sorted(os.listdir(work)) == ["out"], (form, script, os.listdir(work))
        results.append((work / "out").read_bytes())
    return results[0], results[1]


@pytest.mark.parametrize("value", HOSTILE, ids=[repr(v)[1:-1][:30] for v in HOSTILE])
def test_hostile_values_stay_data(value: str, tmp_path: Path) -> None:
    """Every context for one value, in one `bash -c` per form (a folder for each context),
    so that the whole table runs in about a second."""
    env: dict[str, str] = {}
    forms: dict[str, list[str]] = {"script": [], "display": []}
    for k, (name, (text, _)) in enumerate(CONTEXTS.items()):
        rendered = sw.render(sw.plan(text), lambda e: value)
        # The engine puts the values in the environment; here each context's values come
        # through their own variables, exported under the names the script reads.
        env.update({f"V{k}_{n}": v for n, v in rendered.env.items()})
        exports = "".join(f'export {n}="$V{k}_{n}"; ' for n in rendered.env)
        forms["script"].append(f'cd "$ROOT/{name}"; {exports}\n{rendered.script}\n')
        forms["display"].append(f'cd "$ROOT/{name}"\n{rendered.display}\n')
    for form, parts in forms.items():
        work = tmp_path / form
        for name in CONTEXTS:
            (work / name).mkdir(parents=True)
        r = bash("".join(parts), work, {"ROOT": str(work), **(env if form == "script" else {})})
        assert r.returncode == 0, (form, r.stderr)
        for name, (_, expected) in CONTEXTS.items():
            folder = work / name
            assert not (folder / CANARY).exists(), f"{form} form of {name} ran injected code"
            assert sorted(os.listdir(folder)) == ["out"], (form, name, os.listdir(folder))
            assert (folder / "out").read_bytes() == expected(value).encode(), (form, name)
    assert not list(tmp_path.rglob(CANARY))


@pytest.mark.parametrize("context", list(CONTEXTS))
def test_each_context_on_its_own(context: str, tmp_path: Path) -> None:
    # The same check, one `bash -c` per context, exactly as the engine runs a step.
    script, expected = CONTEXTS[context]
    value = "a'b\"c $(touch CANARY) `touch CANARY` *\nEOF\n; touch CANARY"
    got_script, got_display = run_both(script, value, tmp_path)
    assert got_script == got_display == expected(value).encode()


def test_value_never_enters_the_script_text() -> None:
    rendered = sw.render(sw.plan("rm ${{ event.path }}"), lambda e: "x; rm -rf ~")
    assert rendered.script == 'rm "${OPSRUN_X_1}"'
    assert rendered.env == {"OPSRUN_X_1": "x; rm -rf ~"}
    assert rendered.display == "rm 'x; rm -rf ~'"


@pytest.mark.parametrize("script, reference", [
    ("echo ${{ v }}", 'echo "${OPSRUN_X_1}"'),
    ('echo "a ${{ v }}"', 'echo "a ${OPSRUN_X_1}"'),
    ("echo 'a ${{ v }}'", "echo 'a '\"${OPSRUN_X_1}\"''"),
    ("cat <<EOF\n${{ v }}\nEOF", "cat <<EOF\n${OPSRUN_X_1}\nEOF"),
    ("echo hi # ${{ v }}", "echo hi # ${OPSRUN_X_1}"),
])
def test_reference_forms(script: str, reference: str) -> None:
    assert sw.render(sw.plan(script), lambda e: "v").script == reference


def test_each_expression_gets_its_own_variable() -> None:
    values = {"a": "1", "b": "2"}
    rendered = sw.render(sw.plan("cp ${{ a }} ${{ b }} ${{ a }}"), lambda e: values[e.source])
    assert rendered.script == 'cp "${OPSRUN_X_1}" "${OPSRUN_X_2}" "${OPSRUN_X_3}"'
    assert rendered.env == {"OPSRUN_X_1": "1", "OPSRUN_X_2": "2", "OPSRUN_X_3": "1"}


def test_non_text_values_are_rendered_as_text(tmp_path: Path) -> None:
    for value, text in ((None, ""), (True, "true"), (3, "3"), ([1, "a b"], '[1,"a b"]'),
                        ({"k": "v"}, '{"k":"v"}')):
        rendered = sw.render(sw.plan("printf '%s' ${{ v }} > out"), lambda e, v=value: v)
        work = tmp_path / f"v{len(os.listdir(tmp_path))}"
        work.mkdir()
        assert bash(rendered.script, work, rendered.env).returncode == 0
        assert (work / "out").read_text() == text


def test_render_with_a_context() -> None:
    plan = sw.plan("rm ${{ event.path }}")
    rendered = sw.render_with(plan, {"event": {"path": "a b"}})
    assert rendered.env == {"OPSRUN_X_1": "a b"}


# ── limits ──────────────────────────────────────────────────────────────────

def test_value_just_under_the_limit_passes(tmp_path: Path) -> None:
    value = "é" * (sw.MAX_VALUE_BYTES // 2)  # exactly the limit, in two-byte characters
    assert len(value.encode()) == sw.MAX_VALUE_BYTES
    got_script, got_display = run_both("printf '%s' ${{ v }} > out", value, tmp_path)
    assert got_script == value.encode() == got_display


@pytest.mark.parametrize("value", ["x" * (sw.MAX_VALUE_BYTES + 1),
                                   "é" * (sw.MAX_VALUE_BYTES // 2) + "x"])
def test_value_over_the_limit_is_refused(value: str) -> None:
    with pytest.raises(ExpressionError) as exc:
        sw.render(sw.plan("echo ${{ big }}"), lambda e: value)
    assert f"{len(value.encode()):,} bytes" in str(exc.value)
    assert "write it to a file" in str(exc.value)


@pytest.mark.parametrize("value", ["\x00", "a\x00b", "; rm -rf /\x00"])
def test_nul_is_refused(value: str) -> None:
    with pytest.raises(ExpressionError, match="NUL byte"):
        sw.render(sw.plan("echo ${{ v }}"), lambda e: value)


def test_undefined_value_stops_the_render() -> None:
    with pytest.raises(ExpressionError):
        sw.render_with(sw.plan("echo ${{ event.nope }}"), {"event": {}})


# ── where a value cannot go ─────────────────────────────────────────────────

@pytest.mark.parametrize("script, words", [
    ("echo `cat ${{ v }}`", "inside backquotes"),
    ('echo "`cat ${{ v }}`"', "inside backquotes"),
    ("echo $'a ${{ v }}'", "inside $'…' quotes"),
    ("echo ${HOME:-${{ v }}}", "inside ${ … }"),
    ('echo "${x:-${{ v }}}"', "inside ${ … }"),
    ("echo $(( ${{ v }} + 1 ))", "inside arithmetic"),
    ("echo $(( (1 + ${{ v }}) * 2 ))", "inside arithmetic"),
    ("(( x = ${{ v }} ))", "inside arithmetic"),
    ("cat <<'EOF'\n${{ v }}\nEOF", "inside a quoted here-document"),
    ('cat <<"EOF"\n${{ v }}\nEOF', "inside a quoted here-document"),
    ("cat <<\\EOF\n${{ v }}\nEOF", "inside a quoted here-document"),
    ('cat <<E"OF"\n${{ v }}\nEOF', "inside a quoted here-document"),
    ("cat <<-'EOF'\n\t${{ v }}\n\tEOF", "inside a quoted here-document"),
    ("x=$(cat <<'EOF'\n${{ v }}\nEOF\n)", "inside a quoted here-document"),
    ("echo \\${{ v }}", "right after a backslash"),
    ('echo "\\${{ v }}"', "right after a backslash"),
    ("cat <<EOF\n\\${{ v }}\nEOF", "right after a backslash"),
])
def test_forbidden_contexts(script: str, words: str) -> None:
    with pytest.raises(sw.ShellContextError) as exc:
        sw.plan(script)
    assert words in exc.value.message
    assert script[exc.value.offset:].startswith("${{ v }}")


@pytest.mark.parametrize("script", [
    "echo '`' ${{ v }}",  # a backquote inside single quotes is text
    "echo \"$(( 1 + 2 ))\" ${{ v }}",  # arithmetic that is closed
    "echo ${HOME} ${{ v }}",
    "cat <<'EOF'\n$x\nEOF\necho ${{ v }}",  # after the quoted here-document ended
    "echo \\\\${{ v }}",  # an escaped backslash, then the value
    "echo '\\'${{ v }}",  # a backslash inside single quotes escapes nothing
    "echo \"it's\" ${{ v }}",
    "echo a#b ${{ v }}",
])
def test_allowed_after_tricky_text(script: str, tmp_path: Path) -> None:
    plan = sw.plan(script)
    slots = [p for p in plan.parts if isinstance(p, sw.Slot)]
    assert [s.context for s in slots] == [sw.CODE]
    rendered = sw.render(plan, lambda e: "$(touch CANARY)")
    bash(rendered.script, tmp_path, rendered.env)
    assert not (tmp_path / CANARY).exists()


def test_syntax_errors_become_context_errors() -> None:
    with pytest.raises(sw.ShellContextError, match="never closed") as exc:
        sw.plan("echo ok; echo ${{ v ")
    assert exc.value.offset == 14


def test_text_without_expressions_is_one_part() -> None:
    text = "docker inspect -f '{{.State}}' web && echo $((1+2)) `date`"
    assert sw.plan(text).parts == (text,)


def test_slot_records_the_expression() -> None:
    plan = sw.plan("a\n  rm ${{ event.path }}")
    assert plan.parts[1] == sw.Slot(Expr("event.path", 7), sw.CODE)


@pytest.mark.parametrize("shell, posix", [
    ("bash", True), ("sh", True), ("/bin/bash", True), ("bash -euo pipefail", True),
    ("/usr/bin/env bash", True), ("env -S bash -e", True), ("dash", True), ("zsh", True),
    ("", True), ("python3", False), ("/usr/bin/python3 -u", False), ("pwsh", False),
    ("fish", False), ("/usr/bin/env python3", False), ("cmd.exe", False),
])
def test_is_posix_shell(shell: str, posix: bool) -> None:
    assert sw.is_posix_shell(shell) is posix
