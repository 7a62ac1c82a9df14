"""opsrun: operations runbooks that fire on events."""
from __future__ import annotations

# The one place the version is written; pyproject.toml reads it from here. A literal, not
# importlib.metadata, which alone would cost `opsrun --help` about 40 ms.
__version__ = "0.1.0"
