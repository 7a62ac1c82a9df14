"""The only pyyaml importer: YAML text → plain data, with every node's position kept.

Safety rules, all enforced here:
- only plain data (mappings, sequences, strings, numbers, booleans, null); any other tag is refused;
- duplicate keys are an error (PyYAML silently keeps the last one);
- aliases are allowed, but the expanded document is bounded, so an alias bomb fails fast;
- scalars are resolved as in YAML 1.2: only true/false are booleans, so `on:`, `yes`, `no`,
  `NO` (Norway) stay strings, and `010` is the integer 10, not octal 8.
"""
from __future__ import annotations

import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Union

MAX_FILE_BYTES = 1024 * 1024
MAX_NODES = 100_000
MAX_DEPTH = 64

Path_ = tuple[Union[str, int], ...]


class YamlError(Exception):
    """A document that cannot be loaded; `line`/`col` are 1-based (1:1 when the whole file
    is meant, so that every problem reads `file:line:col`)."""

    def __init__(self, message: str, line: int = 1, col: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.col = col


class Document:
    """Loaded data plus where each value (and each mapping key) was written."""

    def __init__(self, data: Any, text: str = "") -> None:
        self.data = data
        self.text = text
        self.value_marks: dict[Path_, tuple[int, int]] = {}
        self.key_marks: dict[Path_, tuple[int, int]] = {}
        self.styles: dict[Path_, str] = {}  # scalar style: '', '"', "'", '|', '>'
        self.spans: dict[Path_, tuple[int, int]] = {}  # scalars: text indexes

    def mark(self, path: Path_, *, key: bool = False) -> tuple[int, int]:
        """Best known (line, col) for a path: the key's position if asked, else the value's."""
        p = tuple(path)
        while True:
            if key and p in self.key_marks:
                return self.key_marks[p]
            if p in self.value_marks:
                return self.value_marks[p]
            if not p:
                return (1, 1)
            p = p[:-1]

    def mark_in_value(self, path: Path_, offset: int) -> tuple[int, int]:
        """Position of the character at `offset` inside the text value at `path`."""
        line, col = self.mark(path)
        p = tuple(path)
        if offset < 0 or p not in self.value_marks:
            return line, col
        found = self._search(p, offset)
        if found is not None:
            return found
        style = self.styles.get(p, "")
        if style in ("|", ">"):
            return self._in_block(line, offset, p)
        return line, col + offset + (1 if style in ("'", '"') else 0)

    def _search(self, path: Path_, offset: int) -> tuple[int, int] | None:
        """Find the value's text from `offset` in the source, where it was written.

        Quotes, escapes and folded lines make a value differ from its source, so the text is
        looked up rather than counted: the value's next few characters (up to anything a
        source may write differently) are found in the scalar's own span, skipping as many
        earlier occurrences as the value has before `offset`."""
        value = _get(self.data, path)
        span = self.spans.get(path)
        if not isinstance(value, str) or span is None or offset >= len(value):
            return None
        needle = re.match(r"[^\n\t\\'\"]{0,40}", value[offset:])
        if needle is None or not needle.group():
            return None
        word = needle.group()
        earlier = sum(1 for i in range(offset) if value.startswith(word, i))
        source = self.text[span[0]:span[1]]
        at = -1
        for _ in range(earlier + 1):
            at = source.find(word, at + 1)
            if at < 0:
                return None
        index = span[0] + at
        line_start = self.text.rfind("\n", 0, index) + 1
        return self.text.count("\n", 0, index) + 1, index - line_start + 1

    def _in_block(self, line: int, offset: int, path: Path_) -> tuple[int, int]:
        # A block scalar's content starts on the line after `|`; count lines from there.
        value = _get(self.data, path)
        if not isinstance(value, str):
            return line, 1
        before = value[:offset]
        nth = before.count("\n")
        lines = self.text.splitlines()
        src_line = line + nth  # 0-based index of the source line holding the offset
        if src_line >= len(lines):
            return line + 1 + nth, 1
        indent = len(lines[src_line]) - len(lines[src_line].lstrip(" "))
        return src_line + 1, indent + offset - (before.rfind("\n") + 1) + 1


_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_INT = re.compile(r"^[-+]?(?:[0-9][0-9_]*|0x[0-9a-fA-F_]+|0o[0-7_]+)$")
_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?$")
_INF = re.compile(r"^[-+]?\.(?:inf|Inf|INF)$")
_NAN = re.compile(r"^\.(?:nan|NaN|NAN)$")

_STR_TAG = "tag:yaml.org,2002:str"
_PLAIN_TAG = "tag:opsrun,2024:plain"  # a plain scalar that YAML 1.1 would read as text
_ALLOWED_TAGS = {
    _STR_TAG, _PLAIN_TAG, "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null", "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq",
    "tag:yaml.org,2002:merge", "tag:yaml.org,2002:timestamp",
}


def load_file(path: Path) -> Document:
    """Read and load one YAML file, refusing files that are too big, binary or not UTF-8."""
    return load_bytes(read_limited(path))


def read_limited(path: Path) -> bytes:
    """A file's bytes, refusing files over the size limit before reading them."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise YamlError(f"cannot read the file: {e.strerror}") from e
    if size > MAX_FILE_BYTES:
        raise YamlError(f"the file is {size:,} bytes; runbooks are limited to "
                        f"{MAX_FILE_BYTES:,} bytes (1 MiB) — split it into several runbooks")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)  # a file growing while read is still bounded
    except OSError as e:
        raise YamlError(f"cannot read the file: {e.strerror}") from e
    return raw


def load_bytes(raw: bytes) -> Document:
    """Load YAML from bytes (UTF-8, an optional BOM is accepted)."""
    if len(raw) > MAX_FILE_BYTES:
        raise YamlError(f"the document is {len(raw):,} bytes; the limit is {MAX_FILE_BYTES:,}")
    if b"\x00" in raw:
        raise YamlError("this is a binary file (it contains NUL bytes), not YAML text",
                        *_byte_position(raw, raw.index(b"\x00")))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise YamlError(f"the file is not valid UTF-8 (byte 0x{raw[e.start]:02x} "
                        f"at offset {e.start}); save it as UTF-8",
                        *_byte_position(raw, e.start)) from e
    return load_text(text.removeprefix("\ufeff"))


def _byte_position(raw: bytes, offset: int) -> tuple[int, int]:
    """1-based (line, column in characters) of a byte offset."""
    line_start = raw.rfind(b"\n", 0, offset) + 1
    col = len(raw[line_start:offset].decode("utf-8", "replace").removeprefix("\ufeff")) + 1
    return raw.count(b"\n", 0, offset) + 1, col


def load_text(text: str) -> Document:
    """Load one YAML document from text."""
    yaml = _yaml()

    if not text.strip() or all(_is_comment_or_blank(ln) for ln in text.splitlines()):
        raise YamlError("the file is empty; a runbook needs at least a `steps:` list")
    try:
        nodes = list(yaml.compose_all(text, Loader=_loader()))
    except yaml.MarkedYAMLError as e:
        raise _syntax_error(e, text) from None
    except yaml.YAMLError as e:
        raise YamlError(f"not valid YAML: {e}") from None
    if len(nodes) != 1 or nodes[0] is None:
        if len(nodes) > 1:
            # Point at the `---` that starts the second document, not at its first key.
            lines = text.splitlines()
            at = min(nodes[1].start_mark.line, len(lines) - 1)  # `---` may end the text
            while at > 0 and not lines[at].startswith("---"):
                at -= 1
            raise YamlError("the file holds several YAML documents (`---`); "
                            "put one runbook in each file", at + 1, 1)
        raise YamlError("the file is empty; a runbook needs at least a `steps:` list")
    doc = Document(data=None, text=text)
    builder = _Builder(doc)
    builder.check_size(nodes[0])
    doc.data = builder.build(nodes[0], (), 0)
    return doc


@lru_cache(maxsize=1)
def _yaml() -> Any:
    """PyYAML, imported with its pure-Python reader's character check compiled on first use.

    That one pattern is a third of PyYAML's import time, and the C loader opsrun uses
    (CSafeLoader, built with LibYAML) never runs it; with the pure-Python loader it is
    compiled at its first use, as before.
    """
    real = re.compile

    def compile_lazily(pattern: Any, flags: int = 0) -> Any:
        if isinstance(pattern, str) and pattern.startswith(_READER_CHECK):
            return _LazyPattern(pattern, flags)
        return real(pattern, flags)

    re.compile = compile_lazily
    try:
        import yaml
    finally:
        re.compile = real
    return yaml


_READER_CHECK = "[^\x09\x0A\x0D\x20-\x7E"  # yaml.reader.Reader.NON_PRINTABLE


class _LazyPattern:
    """A regular expression compiled when it is first used."""

    def __init__(self, pattern: str, flags: int) -> None:
        self._args = (pattern, flags)
        self._compiled: re.Pattern[str] | None = None

    def __getattr__(self, name: str) -> Any:
        if self._compiled is None:
            self._compiled = re.compile(*self._args)
        return getattr(self._compiled, name)


@lru_cache(maxsize=1)
def _loader() -> Any:
    """PyYAML's safe loader (the C one when built), telling apart plain scalars that YAML 1.1
    reads as text from an explicit `!!str`: `0o10` and `1e3` are numbers in YAML 1.2."""
    yaml = _yaml()

    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class _Loader(base):  # type: ignore[misc, valid-type]
        def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
            tag = super().resolve(kind, value, implicit)
            if kind is yaml.ScalarNode and implicit[0] and tag == _STR_TAG:
                return _PLAIN_TAG
            return tag

    return _Loader


def _get(data: Any, path: Path_) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _is_comment_or_blank(line: str) -> bool:
    s = line.strip()
    return not s or s.startswith("#") or s in ("---", "...")


def _syntax_error(e: Any, text: str) -> YamlError:
    mark = e.problem_mark or e.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
    problem = (e.problem or "").strip()
    if e.context == "while scanning a quoted scalar" and e.context_mark is not None:
        # Point at the opening quote, not at the end of the file where the scanner gave up.
        start = e.context_mark
        return YamlError("a quoted value starting here is never closed; add the closing "
                         "quote", start.line + 1, start.column + 1)
    if mark and _tab_near(text, mark.line, mark.column):
        return YamlError("a tab character is used for indentation; YAML allows only spaces",
                         line, col)
    if problem.startswith("mapping values are not allowed"):
        return YamlError("a value contains ': ' (colon and space), which YAML reads as a new "
                         "key; put the whole value in quotes, or write a command as a block "
                         "with `run: |` and the commands on the following lines", line, col)
    context = f" {e.context}" if e.context else ""
    return YamlError(f"not valid YAML: {problem}{context}".rstrip(), line, col)


def _tab_near(text: str, line: int, col: int) -> bool:
    lines = text.splitlines()
    if line >= len(lines):
        return False
    return "\t" in lines[line][: col + 1]


class _Builder:
    """Walks composed nodes, building plain data and recording positions."""

    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.count = 0
        self._open: set[int] = set()  # nodes being sized: an alias back to one is a cycle
        self._sizes: dict[int, int] = {}

    def check_size(self, root: Any) -> None:
        """Refuse an alias bomb before expanding it: sizes are counted once per node, so
        a billion laughs costs as many steps as the file has lines, not a billion."""
        if self._size(root, 0) <= MAX_NODES:
            return
        node = root  # point at the node whose expansion blows up, not at the top
        while True:
            big = [c for c in _children(node) if self._sizes.get(id(c), 0) > MAX_NODES]
            if not big:
                break
            node = big[0]
        raise YamlError(f"the document expands to more than {MAX_NODES:,} values "
                        f"(this part alone to {self._sizes[id(node)]:,}: an alias bomb?); "
                        "refusing to load it",
                        node.start_mark.line + 1, node.start_mark.column + 1)

    def _size(self, node: Any, depth: int) -> int:
        known = self._sizes.get(id(node))
        if known is not None:
            return known
        mark = (node.start_mark.line + 1, node.start_mark.column + 1)
        if depth > MAX_DEPTH:
            raise YamlError(f"the document is nested more than {MAX_DEPTH} levels deep", *mark)
        if id(node) in self._open:
            raise YamlError("an alias refers to the list or mapping that contains it, which "
                            "would never end; refer to something else", *mark)
        self._open.add(id(node))
        size = 1 + sum(self._size(child, depth + 1) for child in _children(node))
        self._open.discard(id(node))
        self._sizes[id(node)] = size
        return size

    def build(self, node: Any, path: Path_, depth: int) -> Any:
        yaml = _yaml()

        self.count += 1
        if self.count > MAX_NODES:
            raise YamlError(f"the document expands to more than {MAX_NODES:,} values "
                            "(an alias bomb?); refusing to load it",
                            node.start_mark.line + 1, node.start_mark.column + 1)
        if depth > MAX_DEPTH:
            raise YamlError(f"the document is nested more than {MAX_DEPTH} levels deep "
                            "(or an alias refers to itself)",
                            node.start_mark.line + 1, node.start_mark.column + 1)
        self.doc.value_marks.setdefault(path, (node.start_mark.line + 1,
                                               node.start_mark.column + 1))
        if node.tag not in _ALLOWED_TAGS:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise YamlError(f"the tag {tag!r} is not allowed; runbooks hold plain data only "
                            "(text, numbers, true/false, lists and mappings)",
                            node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.ScalarNode):
            self.doc.styles.setdefault(path, node.style or "")
            self.doc.spans.setdefault(path, (node.start_mark.index, node.end_mark.index))
            return _scalar(node)
        # check_size() has already refused cycles, so this walk ends.
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path, depth)
        return [self.build(child, (*path, i), depth + 1) for i, child in enumerate(node.value)]

    def _mapping(self, node: Any, path: Path_, depth: int) -> dict[str, Any]:
        yaml = _yaml()

        result: dict[str, Any] = {}
        merged: dict[str, Any] = {}
        for key_node, value_node in node.value:
            kline, kcol = key_node.start_mark.line + 1, key_node.start_mark.column + 1
            if key_node.tag == "tag:yaml.org,2002:merge":
                merged.update(self._merge_source(value_node, path, depth))
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise YamlError("a mapping key must be a plain word, not a list or mapping",
                                kline, kcol)
            # Keys are always text: `on:` must not become the boolean True (YAML 1.1).
            key = str(key_node.value)
            if key in result:
                first = self.doc.key_marks.get((*path, key), (0, 0))
                raise YamlError(f"duplicate key {key!r} (first written at line {first[0]}); "
                                "YAML would silently keep only the last one", kline, kcol)
            self.doc.key_marks[(*path, key)] = (kline, kcol)
            result[key] = self.build(value_node, (*path, key), depth + 1)
        for key, value in merged.items():
            result.setdefault(key, value)
        return result

    def _merge_source(self, node: Any, path: Path_, depth: int) -> dict[str, Any]:
        yaml = _yaml()

        sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
        out: dict[str, Any] = {}
        for src in sources:
            if not isinstance(src, yaml.MappingNode):
                raise YamlError("`<<` merges only mappings", src.start_mark.line + 1,
                                src.start_mark.column + 1)
            for k, v in self._mapping(src, path, depth + 1).items():
                out.setdefault(k, v)
        return out


def _children(node: Any) -> list[Any]:
    if isinstance(node.value, str):
        return []
    return [n for item in node.value for n in (item if isinstance(item, tuple) else (item,))]


def _scalar(node: Any) -> Any:
    value: str = node.value
    # Quoted text, explicit !!str, and what YAML 1.1 calls a timestamp all stay text;
    # PyYAML's 1.1 guess for other plain scalars is redone with the YAML 1.2 rules.
    if node.style or node.tag in (_STR_TAG, "tag:yaml.org,2002:timestamp"):
        return value
    if _NULL.match(value):
        return None
    if value in _BOOL:
        return _BOOL[value]
    if _INT.match(value):
        return _to_int(value)
    if _FLOAT.match(value):
        return float(value.replace("_", ""))
    if _INF.match(value):
        return -math.inf if value.startswith("-") else math.inf
    if _NAN.match(value):
        return math.nan
    return value


def _to_int(value: str) -> int:
    text = value.replace("_", "")
    digits = text.lstrip("+-")
    if digits[:2].lower() in ("0x", "0o"):
        return int(text, 0)
    return int(text, 10)  # `010` is ten in YAML 1.2, not octal eight
