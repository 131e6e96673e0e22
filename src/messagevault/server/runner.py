"""Serving the app in this process until SIGTERM or SIGINT (``messagevault serve``).

aiohttp's ``run_app`` runs the app's startup before it binds the socket, so
a server would announce itself on a port another process holds, then fail
with a traceback. Here the socket is bound first, ``on_listening`` runs only
once it is, and a port that cannot be had is one ``CannotListen`` error.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import ssl
from collections.abc import Callable

from aiohttp import web


class CannotListen(Exception):
    """The server could not bind its socket (port in use, address not here, no permission)."""

    def __init__(self, message: str, *, in_use: bool) -> None:
        super().__init__(message)
        self.in_use = in_use  # the port is taken: another process listens there


async def serve_until_stopped(
    app: web.Application,
    host: str,
    port: int,
    *,
    on_listening: Callable[[int], None],
    shutdown_timeout: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Serve ``app`` on ``host:port`` until SIGTERM or SIGINT, then stop gracefully.

    ``on_listening(port)`` is called once the socket is bound, with the port
    bound. Stopping: no new connections; long polls and tails end at once
    (the app's ``on_shutdown``); requests in flight, appends being
    committed, get up to ``shutdown_timeout`` seconds; then the app's
    ``on_cleanup`` closes its writers. Returns once all that is done.
    ``ssl_context``: serve https with it (``tls.server_context``).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    try:
        await runner.setup()
        try:
            try:
                await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
            except OSError as exc:
                raise CannotListen(
                    f"cannot listen on {host}:{port}: {_reason(exc)}",
                    in_use=exc.errno == errno.EADDRINUSE,
                ) from exc
            on_listening(runner.addresses[0][1])
            await stop.wait()
        finally:
            await runner.cleanup()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)


def _reason(exc: OSError) -> str:
    # asyncio words a failed bind as "error while attempting to bind on
    # address (...): [errno 98] address already in use"; the errno says it
    # plainly. Name lookups (gaierror) carry negative codes of their own.
    if exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)
