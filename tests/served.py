"""An aiohttp app served on a loopback port by an event loop of its own, in a thread.

For tests of blocking clients, which cannot share the test's event loop with
the server they call. The test that starts one stops it (``stop()`` or the
context manager), which also runs the app's shutdown and cleanup.
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType

from aiohttp import web

from tests.azurite import free_port


class ServedApp:
    def __init__(self, app: web.Application, port: int | None = None) -> None:
        self.app = app
        self.port = port or free_port()
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(app, shutdown_timeout=5)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._started = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServedApp:
        """Serve, returning once the socket is bound."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        self._started = True
        return self

    async def _start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def stop(self) -> None:
        """Stop serving, run the app's shutdown and cleanup, end the thread."""
        if self._started:
            self._started = False
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=60)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        if not self._loop.is_closed() and not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> ServedApp:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
