"""Path globs of file and log triggers: one meaning, shared by the matcher and the sources.

`*` and `?` match within one path segment (dot files included), `[…]` is a character
class (`[!…]` negates), and a segment that is exactly `**` matches zero or more whole
segments (at the end of a pattern: one or more, so `/srv/**` means everything below
/srv). Patterns are made absolute (`~` expanded, relative ones taken from the working
directory) because the kernel reports absolute paths.

Ignore globs (`ignore:`) that contain no `/` test names, like .gitignore: `*.swp` ignores
any file of that name, `.git` anything inside a folder of that name below the watched
folder. Ignore globs with a `/` are path globs as above.

This module lives below both `matcher` and `sources/*` so that the two agree on what a
glob means without either importing the other.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

_MAGIC = re.compile(r"[*?\[]")


def has_magic(text: str) -> bool:
    """Whether a path contains glob characters."""
    return _MAGIC.search(text) is not None


@dataclass(frozen=True)
class PathGlob:
    """A compiled path glob."""

    pattern: str  # absolute and normalised
    base: str  # the deepest folder named literally: what to watch or walk
    regex: re.Pattern[str]
    depth: int | None  # segments below `base` a match has; None when `**` allows any

    @property
    def literal(self) -> bool:
        """Whether the pattern names one path and has no glob characters."""
        return not has_magic(self.pattern)

    def matches(self, path: str) -> bool:
        """Whether an absolute path matches."""
        return self.regex.fullmatch(path) is not None

    def expand(self) -> list[str]:
        """Existing paths that match and are not folders, sorted."""
        if self.literal:
            return [self.pattern] if _is_file(self.pattern) else []
        found: list[str] = []
        _walk(self.base, self, 0, found)
        return sorted(found)


def absolute(pattern: str) -> str:
    """A path or glob made absolute and normalised (no `.`, `..` or doubled slashes)."""
    return os.path.normpath(os.path.abspath(os.path.expanduser(pattern)))


@functools.lru_cache(maxsize=4096)
def compile_glob(pattern: str) -> PathGlob:
    """Compile a path glob (cached: runbooks repeat the same globs)."""
    norm = absolute(pattern)
    segments = norm.split("/")[1:]
    regex = "".join(_segment(seg, last=i == len(segments) - 1)
                    for i, seg in enumerate(segments)) or "/"
    literal_segments = 0
    for seg in segments:
        if has_magic(seg):
            break
        literal_segments += 1
    if literal_segments == len(segments):
        literal_segments -= 1  # a literal pattern names a file: its folder is the base
    base = "/" + "/".join(segments[:literal_segments])
    rest = segments[literal_segments:]
    depth = None if "**" in rest else len(rest)
    return PathGlob(norm, base, re.compile(regex), depth)


def ignored(path: str, patterns: tuple[str, ...], base: str = "/") -> bool:
    """Whether `path` is excluded by ignore globs; names are tested below `base`."""
    for pattern in patterns:
        if "/" in pattern:
            if compile_glob(pattern).matches(path):
                return True
            continue
        rel = path[len(base):] if path.startswith(base.rstrip("/") + "/") else path
        name = _name_regex(pattern)
        if any(name.fullmatch(part) for part in rel.split("/") if part):
            return True
    return False


@functools.lru_cache(maxsize=4096)
def _name_regex(pattern: str) -> re.Pattern[str]:
    if pattern == "**":
        return re.compile(".*")
    return re.compile(_segment(pattern, last=True)[1:])


def _segment(seg: str, last: bool) -> str:
    if seg == "**":
        return "(?:/[^/]+)+" if last else "(?:/[^/]+)*"
    out: list[str] = []
    i = 0
    while i < len(seg):
        c = seg[i]
        i += 1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i
            if j < len(seg) and seg[j] == "!":
                j += 1
            if j < len(seg) and seg[j] == "]":
                j += 1
            j = seg.find("]", j)
            if j == -1:
                out.append(re.escape("["))
                continue
            body = seg[i:j].replace("\\", "\\\\")
            if body.startswith("!"):
                body = "^" + body[1:]
            elif body.startswith("^"):
                body = "\\" + body
            out.append(f"(?!/)[{body}]")
            i = j + 1
        else:
            out.append(re.escape(c))
    return "/" + "".join(out)


def _is_file(path: str) -> bool:
    try:
        return not os.path.isdir(path) and os.path.lexists(path)
    except OSError:
        return False


def _walk(folder: str, glob: PathGlob, level: int, found: list[str]) -> None:
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return  # vanished or unreadable: nothing to list there
    for entry in entries:
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            continue
        if is_dir:
            if glob.depth is None or level + 1 < glob.depth:
                _walk(entry.path, glob, level + 1, found)
        elif glob.matches(entry.path):
            found.append(entry.path)
