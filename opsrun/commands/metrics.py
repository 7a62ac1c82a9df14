"""opsrun metrics: the Prometheus text exposition of the state folder and the service."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from opsrun import control_socket, paths
from opsrun.errors import OpsrunError
from opsrun.metrics import exposition
from opsrun.service.metrics_file import collect
from opsrun.store import Store


def main(state_dir: str | None, audit_log: str | None) -> int:
    """Print the exposition; it is complete whether the service runs or not."""
    folder = paths.state_dir_from_env(state_dir)
    paths.check_trusted(folder)
    log_path = Path(audit_log) if audit_log else folder / paths.AUDIT_LOG
    status = _service_status(folder)
    if not (folder / paths.STATE_DB).exists():
        # Nothing ran yet: zeros, without creating a state folder by looking at it.
        sys.stdout.write(exposition(collect(None, log_path, status)))
        return 0
    with Store.open(folder) as store:
        text = exposition(collect(store, log_path, status))
    sys.stdout.write(text)
    return 0


def _service_status(folder: Path) -> dict[str, Any] | None:
    try:
        reply = control_socket.request(folder / paths.CONTROL_SOCKET, {"op": "status"},
                                       timeout_s=10)
    except control_socket.ControlUnavailable:
        return None
    except OpsrunError as e:
        # A service that does not answer is down as far as anyone watching it can tell.
        print(f"opsrun: warning: {e}; reporting opsrun_service_up 0", file=sys.stderr)
        return None
    status = reply.data.get("status")
    return status if isinstance(status, dict) else {}
