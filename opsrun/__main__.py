from __future__ import annotations

from opsrun.cli import main

raise SystemExit(main())
