"""The access log: one JSON line per answered request, at INFO on ``messagevault.access``.

A request observer (``app[REQUEST_OBSERVERS]``), on by default in
``messagevault serve`` and turned off with ``--no-access-log``; a
``--log-level`` above info hides it too. The line carries the path without
its query string (a query may hold anything a client put there, secrets
included) and never a header: the ``Authorization`` header is the password.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from messagevault.server.served import Served

access = logging.getLogger("messagevault.access")


def log_request(served: Served) -> None:
    """Write the access line of one answered request."""
    if not access.isEnabledFor(logging.INFO):
        return
    access.info(
        "%s %s %d",
        served.method,
        served.path,
        served.status,
        extra={
            "request_id": served.request_id,
            "method": served.method,
            "path": served.path,
            "route": served.route,
            "stream": served.stream,
            "kind": served.kind or None,
            "status": served.status,
            "error": served.error,
            "request_bytes": served.request_bytes,
            "response_bytes": served.response_bytes,
            "messages": served.messages,
            "ms": round(served.seconds * 1000, 3),
            "user": served.user,
            "remote": served.remote,
        },
    )
