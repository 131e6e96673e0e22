"""Run a real Azurite (the Azure Storage emulator, from node_modules) for the tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tests.service_process import stop_gracefully, wait_until_up

ROOT = Path(__file__).parent.parent
AZURITE = ROOT / "node_modules" / ".bin" / "azurite-blob"
ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key: public, and only valid against the emulator.
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Azurite:
    """One azurite-blob process on a loopback port, with its data in a temp folder.

    ``stop()`` sends SIGTERM (Azurite then saves its state; SIGKILL would lose
    the last seconds of writes) and ``start()`` brings it back on the same
    port and data, as a restarted storage endpoint would be.
    """

    def __init__(self) -> None:
        if not AZURITE.exists():
            raise RuntimeError(f"{AZURITE} is missing: run `make test` (it runs npm ci)")
        self.port = free_port()
        self.location = Path(tempfile.mkdtemp(prefix="mv-azurite-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.log = self.location.parent / f"{self.location.name}.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={self.endpoint};"
        )

    def start(self, timeout: float = 30.0) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(AZURITE),
                    "--blobHost",
                    "127.0.0.1",
                    "--blobPort",
                    str(self.port),
                    "--location",
                    str(self.location),
                    "--skipApiVersionCheck",  # the SDK speaks a newer API version
                    "--disableTelemetry",
                    "--silent",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until_up(self.process, self._answers, name="azurite", log=self.log, timeout=timeout)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}?comp=list", timeout=1):
                pass
        except urllib.error.HTTPError:
            return True  # 403 without credentials: it is up
        except OSError:
            return False
        return True

    def allow_origin(self, origin: str) -> None:
        """Let pages on ``origin`` read this Azurite as the viewer does (its CORS rule).

        Azurite keeps the rule until it is removed: tests share the session's
        Azurite, so each allows the origin of the page it serves.
        """
        from azure.storage.blob import BlobServiceClient

        from messagevault.storage.azure_cors import allow_origin

        allow_origin(BlobServiceClient.from_connection_string(self.connection_string), origin)

    def stop(self) -> None:
        if self.process is None:
            return
        stop_gracefully(self.process, timeout=30)
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.location, ignore_errors=True)
        if self.log.exists():
            os.unlink(self.log)
