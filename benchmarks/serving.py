"""`messagevault serve` as a benchmark's subprocess: the stress command's embedded server.

``Server`` is ``messagevault.stress.embedded.EmbeddedServer`` with the
benchmarks' user and the folder they choose (which they remove themselves),
plus the name ``base`` they use for its URL.
"""

from __future__ import annotations

import signal
from pathlib import Path

from messagevault.server.auth import Users
from messagevault.stress.embedded import EmbeddedServer, stress_users

USER, PASSWORD = "bench", "bench-password"


class Server(EmbeddedServer):
    """`messagevault serve --fsync always` on file storage in ``folder``; optionally under cProfile.

    The data folder gets the benchmark's user before the server starts, so
    no admin password is printed.
    """

    def __init__(
        self, folder: Path, profile: Path | None = None, users: Users | None = None
    ) -> None:
        super().__init__(
            fsync="always",
            folder=folder,
            user=USER,
            password=PASSWORD,
            users=users or stress_users(PASSWORD, USER),
            profile=profile,
        )

    @property
    def base(self) -> str:
        return self.url

    def stop(self) -> int | None:
        code = super().stop()
        if code not in (0, -signal.SIGKILL):
            print(f"server exited with {code}:\n{self.log_tail()}")
        return code
