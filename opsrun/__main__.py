from __future__ import annotations

from opsrun.launcher import main

raise SystemExit(main())
