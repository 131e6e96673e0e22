"""What the server tells its request observers (metrics, StatsD, the access log) of each answer.

Its own module so that the observers need not import the app that calls them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Served:
    """One answered request, as told to the request observers (metrics, StatsD, access log)."""

    method: str
    route: str  # the route's pattern, e.g. /streams/{stream}/messages ("?" when none matched)
    stream: str | None  # the {stream} of the path, as sent (it may be invalid)
    status: int
    error: str | None  # the error code of an error answer
    seconds: float  # from the handler's start to its answer (a tail: until it ended)
    request_id: str = ""  # also the answer's X-Request-Id
    # A read of messages: "read" (answered at once), "long_poll" (it waited
    # for a commit), "tail" (Server-Sent Events); other routes: "".
    kind: str = ""
    path: str = ""  # without the query string, which may hold anything
    request_bytes: int = 0  # of the body, as received; its Content-Length if answered first
    response_bytes: int | None = None  # of the body; None: not known
    messages: int | None = None  # appended by this request
    user: str | None = None  # who was authenticated; None: nobody (yet)
    remote: str | None = None  # the peer's address


RequestObserver = Callable[[Served], None]
