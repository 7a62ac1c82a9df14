"""sha256 of small texts (a runbook, an audit record) without loading OpenSSL.

hashlib's import sets up every OpenSSL digest and costs a start of `opsrun run` more than
hashing its records does; CPython's own sha256 (`_sha2`, `_sha256` before 3.12) answers
the same bytes. hashlib remains the way for big inputs (audit verify).
"""
from __future__ import annotations

import importlib
from typing import Any


def _constructor() -> Any:
    for name in ("_sha2", "_sha256"):
        try:
            return importlib.import_module(name).sha256
        except ImportError:
            continue
    import hashlib

    return hashlib.sha256


_SHA256 = _constructor()


def sha256_hex(data: bytes) -> str:
    """The sha256 of `data`, as 64 hex digits."""
    text: str = _SHA256(data).hexdigest()
    return text
