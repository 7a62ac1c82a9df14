"""The invalid-runbook corpus: every file in tests/invalid/ must be refused with exactly the
problems its `# expect:` header lines name.

Header format, one line per expected problem, in any order:

    # expect: LINE:COL fragment … fragment … fragment

Each fragment (separated by ` … `) must appear in the message at LINE:COL. A file must
produce exactly its expected problems, no more (so that a mistake is reported once, clearly)
and no fewer. Checked through `load_runbooks` for each file, then once through the real
`opsrun validate tests/invalid` the way an operator (or CI) runs it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from opsrun.errors import Problem, RunbookInvalid
from opsrun.runbook import load_runbook, load_runbooks
from opsrun.yaml_load import MAX_FILE_BYTES
from tests.helpers.cli import no_traceback, opsrun

CORPUS = Path(__file__).parent / "invalid"
DUPNAMES = Path(__file__).parent / "invalid_dupnames"
_EXPECT = re.compile(rb"^# expect: (\d+):(\d+) (.+)$", re.M)


@dataclass(frozen=True)
class Expected:
    line: int
    col: int
    fragments: tuple[str, ...]

    def matches(self, p: Problem) -> bool:
        return (p.line, p.col) == (self.line, self.col) and all(
            f in p.message for f in self.fragments)

    def __str__(self) -> str:
        return f"{self.line}:{self.col} {' … '.join(self.fragments)}"


def expectations(path: Path) -> list[Expected]:
    # Read as bytes: the corpus holds a binary file and one that is not UTF-8.
    out = []
    for m in _EXPECT.finditer(path.read_bytes()):
        text = m.group(3).decode("utf-8")
        out.append(Expected(int(m.group(1)), int(m.group(2)),
                            tuple(f.strip() for f in text.split(" … "))))
    return out


CASES = sorted(p for p in CORPUS.iterdir() if p.suffix == ".yaml")


def check_problems(problems: list[Problem], expected: list[Expected], file: Path) -> None:
    got = [p for p in problems if p.file == str(file)]
    shown = "\n".join(str(p) for p in got) or "(no problems: the file loaded)"
    for e in expected:
        assert any(e.matches(p) for p in got), f"expected {e}\ngot:\n{shown}"
    for p in got:
        assert any(e.matches(p) for e in expected), f"unexpected problem:\n{p}\nall:\n{shown}"
    assert len(got) == len(expected), f"expected {len(expected)} problems, got:\n{shown}"


def test_corpus_is_big_enough() -> None:
    assert len(CASES) >= 45
    for path in CASES:
        assert expectations(path), f"{path.name} has no `# expect:` line"


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_invalid_runbook(path: Path) -> None:
    runbooks, problems = load_runbooks([path])
    assert runbooks == []
    check_problems(problems, expectations(path), path)
    with pytest.raises(RunbookInvalid) as exc:
        load_runbook(path)
    assert sorted(map(str, exc.value.problems)) == sorted(map(str, problems))


def test_file_over_one_mib_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    filler = "# " + "x" * 98 + "\n"
    path.write_text("steps:\n  - run: echo hi\n" + filler * (MAX_FILE_BYTES // len(filler) + 1))
    assert path.stat().st_size > MAX_FILE_BYTES
    runbooks, problems = load_runbooks([path])
    assert runbooks == []
    check_problems(problems, [Expected(1, 1, ("bytes", "limited to 1,048,576 bytes (1 MiB)",
                                             "split it"))], path)


def test_file_of_exactly_one_mib_is_loaded(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    head = "steps:\n  - run: echo hi\n"
    path.write_text(head + "#" * (MAX_FILE_BYTES - len(head) - 1) + "\n")
    assert path.stat().st_size == MAX_FILE_BYTES
    runbooks, problems = load_runbooks([path])
    assert problems == [] and [rb.name for rb in runbooks] == ["big"]


def test_duplicate_names_across_a_folder() -> None:
    runbooks, problems = load_runbooks([DUPNAMES])
    assert [rb.path.name for rb in runbooks] == ["a-restart.yaml"]
    second = DUPNAMES / "b-restart-copy.yaml"
    check_problems(problems, [Expected(3, 1, (
        "the runbook name 'restart-web' is already used by", "a-restart.yaml",
        "names must be unique", "set `name:`"))], second)
    assert len(problems) == 1


def test_duplicate_default_names_from_stems(tmp_path: Path) -> None:
    # `name:` defaults to the file's stem: deploy.yaml and deploy.yml collide.
    (tmp_path / "deploy.yaml").write_text("steps:\n  - run: ./deploy.sh\n")
    (tmp_path / "deploy.yml").write_text("steps:\n  - run: ./deploy.sh --again\n")
    runbooks, problems = load_runbooks([tmp_path])
    assert [rb.name for rb in runbooks] == ["deploy"]
    assert [(Path(p.file).name, p.line, p.col) for p in problems] == [("deploy.yml", 1, 1)]
    assert "the runbook name 'deploy' is already used by" in problems[0].message


def test_validate_cli_reports_every_file_in_one_pass(repo_root: Path) -> None:
    r = opsrun("validate", "tests/invalid", "tests/invalid_dupnames", cwd=repo_root)
    assert r.returncode == 2, r.stdout + r.stderr
    assert no_traceback(r)
    lines = [ln for ln in r.stdout.splitlines() if ln]
    problem_lines = [ln for ln in lines if ": error: " in ln]
    # Every problem line is `file:line:col: error: message`, with no control characters.
    shape = re.compile(r"^(tests/invalid[^:]*\.yaml):(\d+):(\d+): error: (\S.*)$")
    for ln in problem_lines:
        assert shape.match(ln), ln
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", ln), ln
    # Each file's expectations are met, and nothing else is reported.
    reported = [shape.match(ln) for ln in problem_lines]
    for path in CASES:
        rel = f"tests/invalid/{path.name}"
        got = [Problem(m[1], int(m[2]), int(m[3]), m[4]) for m in reported if m and m[1] == rel]
        check_problems(got, expectations(path), Path(rel))
    dup = [m for m in reported if m and m[1].startswith("tests/invalid_dupnames/")]
    assert len(dup) == 1 and "already used by" in dup[0][4]
    total = sum(len(expectations(p)) for p in CASES) + 1
    assert len(problem_lines) == total
    # The last line sums it up.
    assert lines[-1] == (f"{total} problems in {len(CASES) + 1} files; 1 runbook valid")
