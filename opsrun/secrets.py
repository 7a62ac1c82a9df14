"""Secrets: read from OPSRUN_SECRET_<NAME> variables or a 0600 file, masked wherever shown.

A secret is never read from a runbook. `Masker` replaces every secret value with `***`;
`StreamMasker` does the same on output that arrives in chunks, holding back the end of a
chunk that could be the start of a secret, so a value split across two reads is still caught.
"""
from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path

from opsrun.errors import UsageError

ENV_PREFIX = "OPSRUN_SECRET_"
MASK = "***"
MIN_MASK_LEN = 3  # masking one- or two-character values would mangle all output
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def from_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Secrets given as OPSRUN_SECRET_<NAME>=value; the name keeps its case."""
    env = os.environ if environ is None else environ
    return {k[len(ENV_PREFIX):]: v for k, v in env.items()
            if k.startswith(ENV_PREFIX) and len(k) > len(ENV_PREFIX)}


def from_file(path: Path) -> dict[str, str]:
    """Secrets from a NAME=value file that only its owner can read (mode 0600 or 0400)."""
    try:
        st = path.stat()
    except OSError as e:
        raise UsageError(f"cannot read the secrets file {path}: {e.strerror}") from e
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(f"the secrets file {path} can be read by others (mode "
                         f"{stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}`")
    out: dict[str, str] = {}
    for n, line in enumerate(path.read_text("utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name = name.strip().removeprefix("export ").strip()
        if not sep or not _NAME.match(name):
            raise UsageError(f"{path}:{n}: expected NAME=value")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[name] = value
    return out


def load(secrets_file: Path | None = None,
         environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """All secrets: the file first, then the environment (which wins)."""
    found = from_file(secrets_file) if secrets_file else {}
    found.update(from_environ(environ))
    return found


class Masker:
    """Replaces secret values with *** in text."""

    def __init__(self, values: Mapping[str, str] | list[str]) -> None:
        vals = values.values() if isinstance(values, Mapping) else values
        self.values = sorted({v for v in vals if len(v) >= MIN_MASK_LEN}, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(v) for v in self.values)) \
            if self.values else None
        self.longest = len(self.values[0]) if self.values else 0

    def __call__(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(MASK, text)

    def stream(self) -> StreamMasker:
        return StreamMasker(self)


class StreamMasker:
    """Masks a stream of text chunks, catching secrets that straddle two chunks."""

    def __init__(self, masker: Masker) -> None:
        self.masker = masker
        self.carry = ""

    def feed(self, chunk: str) -> str:
        """Masked text that is safe to show now; a possible secret prefix is held back."""
        if not self.masker.values:
            return chunk
        text = self.masker(self.carry + chunk)
        hold = self._held_back(text)
        self.carry = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        out, self.carry = self.masker(self.carry), ""
        return out

    def _held_back(self, text: str) -> int:
        limit = min(len(text), self.masker.longest - 1)
        for n in range(limit, 0, -1):
            tail = text[-n:]
            if any(v.startswith(tail) for v in self.masker.values):
                return n
        return 0
