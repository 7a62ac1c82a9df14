"""Put `${{ … }}` values into a `run:` script so they are always data, never shell syntax.

The value itself never enters the script text. Each expression becomes a reference to an
environment variable holding the value (`"${OPSRUN_X_1}"`), written in the form that is
one word in the quoting context where the expression stands:

    unquoted          echo ${{ v }}        →  echo "${OPSRUN_X_1}"
    double quotes     echo "a ${{ v }}"    →  echo "a ${OPSRUN_X_1}"
    single quotes     echo 'a ${{ v }}'    →  echo 'a '"${OPSRUN_X_1}"''
    here-document     cat <<EOF … ${{ v }} →  cat <<EOF … ${OPSRUN_X_1}

The shell expands a variable once and never parses its contents again, so a value such as
`x; rm -rf ~` or `$(id)` stays one word of text. Where no such form exists — inside
backquotes, `$'…'`, `${…}`, arithmetic, or a quoted here-document — the expression is
refused at validation. The `display` form, with values shell-quoted inline, is what a
person reads in --dry-run, confirmations and the audit log.
"""
from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from opsrun import expressions
from opsrun.errors import ExpressionError
from opsrun.expressions import Expr

_EMPTY_MAP: Mapping[str, Any] = MappingProxyType({})

POSIX_SHELLS = frozenset({"bash", "sh", "dash", "zsh", "ksh", "mksh", "ash", "busybox"})
VAR_PREFIX = "OPSRUN_X_"
MAX_VALUE_BYTES = 120_000  # the kernel refuses one argument or variable over 128 KiB

CODE, DQUOTE, SQUOTE, HEREDOC, COMMENT = "code", "dquote", "squote", "heredoc", "comment"
_FORBIDDEN = {
    "backquote": "inside backquotes `…`; use $( … ) instead",
    "ansi_c": "inside $'…' quotes; use '…' or \"…\" instead",
    "param": "inside ${ … }; assign the value to a variable first, e.g. v=${{ … }}",
    "arith": "inside arithmetic $(( … )); the shell would evaluate the value as code. "
             "Assign it to a variable first and validate it",
    "quoted_heredoc": "inside a quoted here-document (<<'EOF'); use an unquoted <<EOF",
    "escaped": "right after a backslash `\\`, which would change how the shell reads the "
               "value; remove the backslash",
}


class ShellContextError(ValueError):
    """An expression stands where no quoting can keep its value one word."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset


class Slot(NamedTuple):
    """An expression in a script and the quoting context it stands in."""

    expr: Expr
    context: str
    delimiter: str = ""  # in a here-document body: the line that ends it
    strip_tabs: bool = False  # ... and whether it is a <<- here-document


class ShellPlan(NamedTuple):
    """A parsed `run:` script: literal text and the slots where values go."""

    parts: tuple[str | Slot, ...]


class RenderedScript(NamedTuple):
    script: str  # what the shell runs: values only referenced through variables
    env: Mapping[str, str] = _EMPTY_MAP  # the variables' values
    display: str = ""  # for people: values shell-quoted inline


def plan(text: str) -> ShellPlan:
    """Split a script into text and slots; raise ShellContextError where a value can't go."""
    try:
        parts = expressions.split(text)
    except expressions.ExpressionSyntaxError as e:
        raise ShellContextError(e.message, e.offset) from None
    scanner = _Scanner()
    out: list[str | Slot] = []
    for part in parts:
        if isinstance(part, Expr):
            ctx = scanner.context()
            if ctx in _FORBIDDEN:
                raise ShellContextError(f"`${{{{ {part.source} }}}}` cannot be used "
                                        f"{_FORBIDDEN[ctx]}", part.offset)
            doc = scanner.heredoc if ctx == HEREDOC else None
            out.append(Slot(part, ctx, doc[0] if doc else "", doc[2] if doc else False))
        else:
            scanner.feed(part)
            out.append(part)
    return ShellPlan(tuple(out))


class Unknown:
    """A value that cannot be known yet, returned by an evaluate function in a dry run."""


def render(shell_plan: ShellPlan, evaluate: Callable[[Expr], Any]) -> RenderedScript:
    """Evaluate each slot and build the script, its variables, and the display form."""
    script: list[str] = []
    display: list[str] = []
    env: dict[str, str] = {}
    for part in shell_plan.parts:
        if isinstance(part, str):
            script.append(part)
            display.append(part)
            continue
        raw = evaluate(part.expr)
        if isinstance(raw, Unknown):
            # Not known yet (a dry run before the steps it reads): show it as written.
            display.append(f"${{{{ {part.expr.source} }}}}")
            script.append(f"${{{{ {part.expr.source} }}}}")
            continue
        value = expressions.to_text(raw)
        check_value(value, part.expr.source)
        name = f"{VAR_PREFIX}{len(env) + 1}"
        env[name] = value
        script.append(_reference(name, part.context))
        display.append(_inline(value, part))
    return RenderedScript("".join(script), env, "".join(display))


def render_with(shell_plan: ShellPlan, context: Mapping[str, Any]) -> RenderedScript:
    """Render against an expression context."""
    return render(shell_plan, lambda e: expressions.evaluate(e.source, context))


def check_value(value: str, source: str) -> None:
    """Refuse values no process can receive: NUL bytes, or too long for one variable."""
    if "\x00" in value:
        raise ExpressionError(f"`${{{{ {source} }}}}` contains a NUL byte, which no command "
                              "can receive; refusing to run")
    size = len(value.encode("utf-8", "surrogateescape"))
    if size > MAX_VALUE_BYTES:
        raise ExpressionError(f"`${{{{ {source} }}}}` is {size:,} bytes; a command can receive "
                              f"at most {MAX_VALUE_BYTES:,} bytes in one value — "
                              "write it to a file in an earlier step instead")


def _reference(name: str, context: str) -> str:
    if context == CODE:
        return f'"${{{name}}}"'
    if context == SQUOTE:
        return f"'\"${{{name}}}\"'"
    return f"${{{name}}}"  # double quotes, here-document body, comment


def _inline(value: str, slot: Slot) -> str:
    context = slot.context
    if context == CODE:
        return shlex.quote(value)
    if context == SQUOTE:
        return "'" + shlex.quote(value) + "'"
    if context == DQUOTE:
        return re.sub(r'([\\$`"])', r"\\\1", value)
    if context == HEREDOC:
        # In a here-document body only \ $ ` are special (a `"` stays as it is). A value line
        # that would read as the closing delimiter, or lose its tabs to <<-, starts with `$(:)`,
        # which expands to nothing but keeps the shell from seeing the line as written.
        lines = re.sub(r"([\\$`])", r"\\\1", value).split("\n")
        for i, line in enumerate(lines):
            if (slot.delimiter and line.startswith(slot.delimiter)) or (
                    slot.strip_tabs and line.startswith("\t")):
                lines[i] = "$(:)" + line
        return "\n".join(lines)
    return value.replace("\n", "\\n")


def is_posix_shell(shell: str) -> bool:
    """Whether `shell:` names a POSIX shell, where the quoting above holds."""
    words = shlex.split(shell) if shell.strip() else ["bash"]
    if words[0].rsplit("/", 1)[-1] == "env":
        # `/usr/bin/env bash`, `env -S bash -e`: the shell is the first word env runs.
        words = [w for w in words[1:] if not w.startswith("-") and "=" not in w] or ["env"]
    return words[0].rsplit("/", 1)[-1] in POSIX_SHELLS


_HEREDOC_START = re.compile(
    r"""<<(-?)[ \t]*((?:'[^']*'|"[^"]*"|\\.|[^\s;&|<>()'"\\])+)""")


class _Scanner:
    """A small model of how bash reads quotes, enough to know the context at any point."""

    def __init__(self) -> None:
        self.stack: list[str] = [CODE]
        self.heredocs: list[tuple[str, bool, bool]] = []  # (delimiter, quoted, strip_tabs)
        self.heredoc: tuple[str, bool, bool] | None = None
        self.heredoc_depth = 1  # the stack depth of the code the here-document belongs to
        self.line = ""  # current line inside a here-document body
        self.word_start = True
        self.escaped = False  # the text fed so far ends with a backslash escaping what follows

    def _in_heredoc(self) -> bool:
        return self.heredoc is not None and len(self.stack) == self.heredoc_depth

    def context(self) -> str:
        if self.escaped:
            return "escaped"
        if self._in_heredoc():
            assert self.heredoc is not None
            return "quoted_heredoc" if self.heredoc[1] else HEREDOC
        top = self.stack[-1]
        return {CODE + ")": CODE, "arith_paren": "arith"}.get(top, top)

    def feed(self, text: str) -> None:
        i = 0
        while i < len(text):
            i = self._step(text, i)
        self.escaped = i > len(text)

    def _step(self, t: str, i: int) -> int:
        if self._in_heredoc():
            return self._heredoc_char(t, i)
        top = self.stack[-1]
        c = t[i]
        if top == COMMENT:
            if c == "\n":
                self.stack.pop()
                return self._newline(i)
            return i + 1
        if top in (SQUOTE, "quoted_heredoc"):
            if c == "'":
                self.stack.pop()
            return i + 1
        if top == "ansi_c":
            if c == "\\":
                return i + 2
            if c == "'":
                self.stack.pop()
            return i + 1
        if c == "\\":
            return i + 2
        if top == "backquote":
            if c == "`":
                self.stack.pop()
            return i + 1
        if t.startswith("$((", i):
            self.stack.append("arith")
            return i + 3
        if t.startswith("$(", i):
            self.stack.append(CODE + ")")
            return i + 2
        if t.startswith("${", i):
            self.stack.append("param")
            return i + 2
        if c == "`":
            self.stack.append("backquote")
            return i + 1
        if top == DQUOTE:
            if c == '"':
                self.stack.pop()
            return i + 1
        if top == "param":
            if c == "}":
                self.stack.pop()
            return i + 1
        if top == "arith":
            return self._arith_char(t, i)
        return self._code_char(t, i)

    def _arith_char(self, t: str, i: int) -> int:
        if t.startswith("))", i):
            self.stack.pop()
            return i + 2
        if t[i] == "(":
            self.stack.append("arith_paren")
        return i + 1

    def _code_char(self, t: str, i: int) -> int:
        c = t[i]
        if self.stack[-1] == "arith_paren":
            if c == ")":
                self.stack.pop()
            return i + 1
        if c == "'":
            self.stack.append(SQUOTE)
        elif c == '"':
            self.stack.append(DQUOTE)
        elif c == "$" and t.startswith("$'", i):
            self.stack.append("ansi_c")
            return i + 2
        elif c == "#" and self.word_start:
            self.stack.append(COMMENT)
        elif c == "(" and t.startswith("((", i) and self.word_start:
            self.stack.append("arith")
            return i + 2
        elif c == ")" and self.stack[-1] == CODE + ")":
            self.stack.pop()
        elif t.startswith("<<", i) and not t.startswith("<<<", i):
            return self._heredoc_start(t, i)
        elif c == "\n":
            return self._newline(i)
        self.word_start = c in " \t;&|(){}"
        return i + 1

    def _heredoc_start(self, t: str, i: int) -> int:
        # The delimiter is one shell word; any quoting in it (`'EOF'`, `"EOF"`, `\EOF`,
        # `E"OF"`) makes the body literal text.
        m = _HEREDOC_START.match(t, i)
        if not m:
            return i + 2
        word = m.group(2)
        quoted = any(q in word for q in "'\"\\")
        delimiter = re.sub(r"'([^']*)'|\"([^\"]*)\"|\\(.)",
                           lambda q: q.group(1) or q.group(2) or q.group(3) or "", word)
        self.heredocs.append((delimiter, quoted, m.group(1) == "-"))
        return m.end()

    def _newline(self, i: int) -> int:
        self.word_start = True
        if self.heredocs and self.stack[-1] in (CODE, CODE + ")"):
            self.heredoc = self.heredocs.pop(0)
            self.heredoc_depth = len(self.stack)
            self.line = ""
        return i + 1

    def _heredoc_char(self, t: str, i: int) -> int:
        assert self.heredoc is not None
        c = t[i]
        if c == "\n":
            line = self.line.lstrip("\t") if self.heredoc[2] else self.line
            if line == self.heredoc[0]:
                self.heredoc = self.heredocs.pop(0) if self.heredocs else None
            self.line = ""
            return i + 1
        self.line += c
        if not self.heredoc[1]:
            if c == "\\":
                return i + 2
            if t.startswith("$(", i) or t.startswith("${", i) or c == "`":
                # An expansion inside the body: scan it as code until it closes.
                return self._heredoc_expansion(t, i)
        return i + 1

    def _heredoc_expansion(self, t: str, i: int) -> int:
        saved = self.heredoc
        depth = len(self.stack)
        self.heredoc = None
        j = self._step(t, i)
        while j < len(t) and len(self.stack) > depth:
            j = self._step(t, j)
        self.heredoc = saved
        self.line += t[i + 1:j]
        return j
