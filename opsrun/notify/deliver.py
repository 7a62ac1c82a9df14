"""One delivery attempt of one notification: an HTTP POST (urllib) or a command (proc.py).

The answer says whether the notification got there, and if not whether trying again may
help: a webhook's 2xx is delivered; 429, 5xx, a timeout or a connection error are tried
again; another 4xx (or a redirect) will not get better and is given up. A command that
exits 0 delivered it; any other exit is tried again, except a command that cannot start.
Reasons never hold a secret: the rendered URL and headers are not put in them, and they
are masked besides.
"""
from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any, NamedTuple

from opsrun import expressions
from opsrun.errors import ExpressionError
from opsrun.notify import message as message_mod
from opsrun.notify.targets import Target
from opsrun.secrets import Masker


class Outcome(NamedTuple):
    delivered: bool
    retry: bool  # when not delivered: may another attempt succeed?
    reason: str  # for the audit log; no secrets


class _MissingSecret(dict[str, str]):
    def __missing__(self, key: str) -> str:
        raise ExpressionError(f"the secret {key!r} is not set for this opsrun; give it as "
                              f"OPSRUN_SECRET_{key}=… or in the secrets file")


def attempt(target: Target, msg: Mapping[str, Any], secrets: Mapping[str, str]) -> Outcome:
    """Try to deliver `msg` to `target` once, within the target's timeout."""
    mask = Masker(dict(secrets))
    try:
        if target.kind == "webhook":
            out = _post(target, msg, secrets)
        else:
            out = _command(target, msg)
    except ExpressionError as e:  # a secret the target needs is missing: it stays missing
        out = Outcome(False, False, str(e))
    return out._replace(reason=mask(out.reason))


def _render(text: str, secrets: Mapping[str, str]) -> str:
    return expressions.render_text(text, {"secrets": _MissingSecret(secrets)})


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A webhook that redirects is answered as it is: a POST is not replayed elsewhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _post(target: Target, msg: Mapping[str, Any], secrets: Mapping[str, str]) -> Outcome:
    url = _render(target.url or "", secrets)
    body = message_mod.slack_body(msg) if target.format == "slack" else dict(msg)
    from opsrun import __version__

    headers = {"Content-Type": "application/json; charset=utf-8",
               "User-Agent": f"opsrun/{__version__}"}
    headers.update({k: _render(v, secrets) for k, v in target.headers.items()})
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers,
                                     method="POST")
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=target.timeout_s) as response:
            response.read(64 * 1024)
            return Outcome(True, False, f"HTTP {response.status}")
    except urllib.error.HTTPError as e:
        code = e.code
        e.close()
        why = f"HTTP {code} {e.reason}".strip()
        if code == 429 or code >= 500:
            return Outcome(False, True, why)
        if 300 <= code < 400:
            return Outcome(False, False, f"{why}: the webhook redirects; give the URL it "
                                         "redirects to")
        return Outcome(False, False, why)
    except (TimeoutError, socket.timeout):
        return Outcome(False, True, f"no answer within {target.timeout_s:g}s")
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, (TimeoutError, socket.timeout)):
            return Outcome(False, True, f"no answer within {target.timeout_s:g}s")
        return Outcome(False, True, f"cannot connect: {getattr(reason, 'strerror', None) or reason}")
    except (OSError, ValueError) as e:  # a reset connection; a URL a secret made invalid
        return Outcome(False, isinstance(e, OSError), f"cannot send: {e}")


def _command(target: Target, msg: Mapping[str, Any]) -> Outcome:
    from opsrun import proc

    env = {**os.environ, **message_mod.environment(msg)}
    code, err = proc.run_with_input(target.argv, str(msg["text"]).encode() + b"\n", env=env,
                                    timeout_s=target.timeout_s)
    if code == 0:
        return Outcome(True, False, "exit code 0")
    last = err.strip().splitlines()[-1] if err.strip() else ""
    if code in (126, 127):  # not found, not executable: trying again will not help
        return Outcome(False, False, f"exit code {code}" + (f": {last}" if last else ""))
    return Outcome(False, True, f"exit code {code}" + (f": {last}" if last else ""))
