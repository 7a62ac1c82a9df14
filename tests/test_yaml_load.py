"""The YAML loader: safe, strict, YAML 1.2 scalars, and every value's position kept."""
from __future__ import annotations

from pathlib import Path

import pytest

from opsrun.yaml_load import (
    MAX_DEPTH,
    MAX_FILE_BYTES,
    YamlError,
    load_bytes,
    load_file,
    load_text,
)


def refused(text: str | bytes) -> YamlError:
    with pytest.raises(YamlError) as exc:
        load_bytes(text.encode() if isinstance(text, str) else text)
    return exc.value


# ── duplicate keys ──────────────────────────────────────────────────────────

@pytest.mark.parametrize("text, line, col, key, first", [
    ("a: 1\nb: 2\na: 3\n", 3, 1, "a", 1),
    ("steps:\n  - run: x\n    env:\n      A: 1\n      B: 2\n      A: 3\n", 6, 7, "A", 4),
    ("x: {a: 1, b: 2, a: 3}\n", 1, 17, "a", 1),
    ("l:\n  - - {k: 1}\n    - {k: 1, k: 2}\n", 3, 14, "k", 3),
    # Quoting does not make a different key.
    ("name: a\n'name': b\n", 2, 1, "name", 1),
])
def test_duplicate_keys_at_any_depth(text: str, line: int, col: int, key: str,
                                     first: int) -> None:
    e = refused(text)
    assert (e.line, e.col) == (line, col)
    assert f"duplicate key {key!r} (first written at line {first})" in e.message
    assert "silently keep only the last one" in e.message


def test_same_key_in_sibling_mappings_is_fine() -> None:
    doc = load_text("a: {k: 1}\nb: {k: 2}\nl: [{k: 1}, {k: 2}]\n")
    assert doc.data == {"a": {"k": 1}, "b": {"k": 2}, "l": [{"k": 1}, {"k": 2}]}


# ── aliases ─────────────────────────────────────────────────────────────────

def billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        refs = ",".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused() -> None:
    e = refused(billion_laughs())  # 9**9 = 387 million strings once expanded
    assert "expands to more than 100,000 values" in e.message
    assert "alias bomb" in e.message
    # It points at the first list whose expansion is too big: a5, 9**6 strings.
    assert (e.line, e.col) == (6, 5)
    assert "this part alone to 597,871" in e.message


def test_alias_bomb_is_refused_before_expanding_it() -> None:
    # 30 levels would be 9**30 values: only counting each node once can refuse it at all.
    e = refused(billion_laughs(30))
    assert "alias bomb" in e.message


def test_alias_bomb_through_merge_keys_is_refused() -> None:
    lines = ["m0: &m0 {" + ", ".join(f"k{j}: [1, 2, 3, 4, 5, 6, 7, 8]" for j in range(9)) + "}"]
    for i in range(1, 8):
        lines.append(f"m{i}: &m{i} {{" + ", ".join(f"k{j}: *m{i - 1}" for j in range(9)) + "}")
    e = refused("\n".join(lines) + "\n")
    assert "alias bomb" in e.message


def test_small_aliases_are_allowed() -> None:
    doc = load_text("base: &b [web-1, web-2]\nhosts: *b\nmore: [*b, *b]\n")
    assert doc.data["hosts"] == ["web-1", "web-2"]
    assert doc.data["more"] == [["web-1", "web-2"], ["web-1", "web-2"]]


@pytest.mark.parametrize("text", [
    "a: &a [1, *a]\n",
    "a: &a {b: *a}\n",
    "&a [x, [y, *a]]\n",
])
def test_recursive_alias_is_refused(text: str) -> None:
    e = refused(text)
    assert "refers to the list or mapping that contains it" in e.message


def test_recursive_merge_is_refused() -> None:
    e = refused("a: &a {x: 1, <<: *a}\n")
    assert "refers to the list or mapping that contains it" in e.message


def test_nesting_is_bounded() -> None:
    e = refused("a: " + "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5) + "\n")
    assert f"nested more than {MAX_DEPTH} levels" in e.message


# ── text that is not a runbook document ─────────────────────────────────────

def test_tabs_for_indentation() -> None:
    e = refused("steps:\n  - run: x\n\ttimeout: 1s\n")
    assert (e.line, e.col) == (3, 1)
    assert e.message == "a tab character is used for indentation; YAML allows only spaces"


def test_tab_inside_a_value_is_fine() -> None:
    assert load_text('run: "a\tb"\nx: |\n  col1\tcol2\n').data == {
        "run": "a\tb", "x": "col1\tcol2\n"}


@pytest.mark.parametrize("text, kind", [
    ("- a\n- b\n", list), ("just text\n", str), ("42\n", int), ("true\n", bool),
])
def test_non_mapping_document_loads_as_such(text: str, kind: type) -> None:
    # The loader loads any plain document; the runbook layer refuses what is not a mapping.
    assert isinstance(load_text(text).data, kind)


@pytest.mark.parametrize("raw", [b"", b"   \n\n", b"\n", b"---\n", b"---\n...\n"])
def test_empty_file(raw: bytes) -> None:
    e = refused(raw)
    assert (e.line, e.col) == (1, 1)
    assert "the file is empty" in e.message and "`steps:`" in e.message


def test_comment_only_file() -> None:
    e = refused("# TODO: write this runbook\n\n   # later\n")
    assert "the file is empty" in e.message


def test_empty_file_on_disk(tmp_path: Path) -> None:
    p = tmp_path / "empty.yaml"
    p.write_bytes(b"")
    with pytest.raises(YamlError, match="the file is empty"):
        load_file(p)


def test_binary_file() -> None:
    e = refused(b"steps:\n  - run: \x7fELF\x00\x01\x02\n")
    assert "binary file" in e.message and "NUL" in e.message
    assert (e.line, e.col) == (2, 14)


def test_binary_file_on_disk(tmp_path: Path) -> None:
    p = tmp_path / "a.yaml"
    p.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(YamlError, match="binary file"):
        load_file(p)


def test_utf8_bom_is_accepted() -> None:
    doc = load_bytes(b"\xef\xbb\xbfname: caf\xc3\xa9\nsteps: []\n")
    assert doc.data == {"name": "café", "steps": []}
    assert doc.mark(("name",), key=True) == (1, 1)
    assert doc.mark(("steps",)) == (2, 8)


def test_invalid_utf8() -> None:
    e = refused(b"name: x\nrun: echo caf\xe9\n")
    assert "not valid UTF-8" in e.message and "0xe9" in e.message
    assert "save it as UTF-8" in e.message
    assert (e.line, e.col) == (2, 14)


def test_invalid_utf8_column_counts_characters() -> None:
    e = refused("run: \u00e9\u00e9 ".encode() + b"\xff\n")
    assert (e.line, e.col) == (1, 9)


def test_several_documents() -> None:
    e = refused("a: 1\n---\nb: 2\n")
    assert "several YAML documents" in e.message
    assert (e.line, e.col) == (2, 1)


def test_file_size_limit(tmp_path: Path) -> None:
    p = tmp_path / "big.yaml"
    p.write_bytes(b"a: 1\n" + b"#" * MAX_FILE_BYTES)
    with pytest.raises(YamlError, match=r"limited to 1,048,576 bytes \(1 MiB\)"):
        load_file(p)
    with pytest.raises(YamlError, match="the limit is 1,048,576"):
        load_bytes(p.read_bytes())


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(YamlError, match="cannot read the file"):
        load_file(tmp_path / "nope.yaml")


def test_syntax_error_has_a_position() -> None:
    e = refused("steps:\n  - run: [unclosed\n")
    assert e.line >= 2 and e.col >= 1
    assert e.message.startswith("not valid YAML")


def test_colon_space_in_a_plain_value() -> None:
    e = refused("steps:\n  - run: echo Status: ok\n")
    assert (e.line, e.col) == (2, 21)
    assert "put the whole value in quotes" in e.message


def test_unclosed_quote_points_at_the_opening_quote() -> None:
    e = refused('a: 1\nrun: "echo hi\nb: 2\n')
    assert (e.line, e.col) == (2, 6)
    assert "never closed" in e.message


# ── YAML 1.2 scalars ────────────────────────────────────────────────────────

@pytest.mark.parametrize("text, value", [
    ("on", "on"), ("off", "off"), ("yes", "yes"), ("no", "no"), ("NO", "NO"), ("y", "y"),
    ("Yes", "Yes"), ("true", True), ("false", False), ("True", True), ("FALSE", False),
    ("010", 10), ("0o10", 8), ("0x1F", 31), ("1_000", 1000), ("-3", -3), ("+7", 7),
    ("1.5", 1.5), ("1e3", 1000.0), (".5", 0.5), ("~", None), ("null", None), ("", None),
    ("2024-01-31", "2024-01-31"), ("2024-01-31T10:00:00Z", "2024-01-31T10:00:00Z"),
    ("12:30", "12:30"), ("1:20:30", "1:20:30"), ("0777", 777), ("'010'", "010"),
    ('"true"', "true"), ("!!str 10", "10"), ("web-1", "web-1"), ("3s", "3s"),
])
def test_yaml_12_scalars(text: str, value: object) -> None:
    data = load_text(f"v: {text}\n").data
    assert data["v"] == value
    assert type(data["v"]) is type(value)


def test_on_key_stays_a_string() -> None:
    data = load_text("on:\n  - schedule: {cron: '0 * * * *'}\nyes: 1\nno: 2\ntrue: 3\n").data
    assert list(data) == ["on", "yes", "no", "true"]
    assert all(isinstance(k, str) for k in data)


def test_special_floats() -> None:
    data = load_text("a: .inf\nb: -.Inf\nc: .nan\n").data
    assert data["a"] == float("inf") and data["b"] == float("-inf")
    assert data["c"] != data["c"]


def test_merge_keys() -> None:
    doc = load_text(
        "defaults: &d {timeout: 30s, retry: 2}\n"
        "steps:\n"
        "  - <<: *d\n"
        "    run: a\n"
        "  - <<: *d\n"
        "    retry: 5\n"
        "    run: b\n"
        "  - <<: [{x: 1}, {x: 2, y: 3}]\n"
        "    run: c\n")
    steps = doc.data["steps"]
    assert steps[0] == {"timeout": "30s", "retry": 2, "run": "a"}
    assert steps[1] == {"timeout": "30s", "retry": 5, "run": "b"}  # the explicit key wins
    assert steps[2] == {"x": 1, "y": 3, "run": "c"}  # the first source wins
    assert "<<" not in steps[0]


def test_merge_of_a_non_mapping_is_refused() -> None:
    e = refused("a: &a [1]\nb:\n  <<: *a\n")
    assert "`<<` merges only mappings" in e.message


@pytest.mark.parametrize("text, tag", [
    ("a: !!python/object/apply:os.system ['id']\n", "!!python/object/apply:os.system"),
    ("a: !!python/name:os.system\n", "!!python/name:os.system"),
    ("a: !!binary aGVsbG8=\n", "!!binary"),
    ("a: !!set {x, y}\n", "!!set"),
    ("a: !!omap [{x: 1}]\n", "!!omap"),
    ("a: !Ref other\n", "!Ref"),
    ("!!python/object:os.environ {}\n", "!!python/object:os.environ"),
])
def test_disallowed_tags(text: str, tag: str) -> None:
    e = refused(text)
    assert f"the tag {tag!r} is not allowed" in e.message
    assert "plain data only" in e.message
    assert e.line == 1


def test_complex_keys_are_refused() -> None:
    e = refused("? [a, b]\n: 1\n")
    assert "a mapping key must be a plain word" in e.message


# ── positions ───────────────────────────────────────────────────────────────

SAMPLE = """\
name: demo
on:
  - log:
      path: /var/log/x
steps:
  - id: first
    run: echo hi
  - {id: second, run: "echo ho"}
"""


@pytest.mark.parametrize("path, key, pos", [
    (("name",), True, (1, 1)),
    (("name",), False, (1, 7)),
    (("on",), True, (2, 1)),
    (("on",), False, (3, 3)),
    (("on", 0), False, (3, 5)),
    (("on", 0, "log"), True, (3, 5)),
    (("on", 0, "log", "path"), True, (4, 7)),
    (("on", 0, "log", "path"), False, (4, 13)),
    (("steps", 0, "id"), True, (6, 5)),
    (("steps", 0, "run"), False, (7, 10)),
    (("steps", 1), False, (8, 5)),
    (("steps", 1, "run"), True, (8, 18)),
    (("steps", 1, "run"), False, (8, 23)),
    # A path that does not exist falls back to its nearest known parent.
    (("steps", 1, "nope"), False, (8, 5)),
    (("nothing",), False, (1, 1)),
])
def test_positions(path: tuple[str | int, ...], key: bool, pos: tuple[int, int]) -> None:
    assert load_text(SAMPLE).mark(path, key=key) == pos


MARK_SOURCE = """\
steps:
  - run: echo ${{ a }}
  - run: "echo \\"hi\\" ${{ b }}"
  - run: 'it''s ${{ c }}'
  - run: |
      first
        second ${{ d }}
  - run: >
      echo one
      ${{ e }}
  - run: echo plain
      continued ${{ f }}
  - run: "line1\\n${{ g }}"
  - run: |-
      x ${{ h }} ${{ h }}
"""


@pytest.mark.parametrize("index, nth, pos", [
    (0, 0, (2, 15)),  # plain
    (1, 0, (3, 23)),  # double quoted, escapes before it
    (2, 0, (4, 17)),  # single quoted, '' before it
    (3, 0, (7, 16)),  # literal block, more indented line
    (4, 0, (10, 7)),  # folded block
    (5, 0, (12, 17)),  # plain scalar over two lines
    (6, 0, (13, 18)),  # \n escape in double quotes
    (7, 0, (15, 9)),  # block, first of two equal expressions
    (7, 1, (15, 18)),  # ... and the second
])
def test_mark_in_value(index: int, nth: int, pos: tuple[int, int]) -> None:
    doc = load_text(MARK_SOURCE)
    value = doc.data["steps"][index]["run"]
    offset = -1
    for _ in range(nth + 1):
        offset = value.index("${{", offset + 1)
    assert doc.mark_in_value(("steps", index, "run"), offset) == pos
    line, col = pos
    assert MARK_SOURCE.splitlines()[line - 1][col - 1:].startswith("${{")


def test_mark_in_value_offset_zero_is_the_value() -> None:
    doc = load_text(MARK_SOURCE)
    assert doc.mark_in_value(("steps", 0, "run"), 0) == doc.mark(("steps", 0, "run"))
