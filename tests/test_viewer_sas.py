"""The viewer left open on an Azure stream: its SAS URL is renewed before it expires, Live goes on.

A SAS URL the server hands out expires (an hour by default). A viewer left
open on a stream, following it, must ask the server for a new one before
then and carry on, or it would stop with an error after an hour. Here the
server hands out SAS URLs that expire after 122 s, so the viewer (which
renews 120 s before expiry) renews every couple of seconds.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from tests.azurite import Azurite
from tests.serve_process import serve_process

if TYPE_CHECKING:
    from playwright.sync_api import Browser

PASSWORD = "viewer-secret-1"
SHORT_SAS = """
import datetime, runpy, sys
from messagevault.storage.azure import AzureStorage
AzureStorage.__init__.__kwdefaults__["sas_expiry"] = datetime.timedelta(seconds=122)
sys.argv[0] = "messagevault"
runpy.run_module("messagevault.cli", run_name="__main__")
"""


def _publish(url: str, stream: str, records: list[dict[str, str]]) -> dict[str, object]:
    request = urllib.request.Request(
        f"{url}/streams/{stream}",
        data=json.dumps({"messages": records}).encode(),
        method="POST",
        headers={
            "Authorization": "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode(),
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        result: dict[str, object] = json.load(answer)
        return result


def _paths(log: Path) -> list[str]:
    paths = []
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "path" in entry:
            paths.append(entry["path"])
    return paths


def test_a_viewer_following_an_azure_stream_renews_its_sas_and_goes_on(
    browser: Browser, azurite: Azurite, tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    with serve_process(
        tmp_path,
        "admin",
        PASSWORD,
        storage=f"azure:{azurite.connection_string}",
        log=log,
        launcher=("-c", SHORT_SAS),
    ) as url:
        azurite.allow_origin(url)
        _publish(url, "renewals", [{"key": f"k{i}", "value": f"v{i}"} for i in range(5)])
        page = browser.new_page()
        try:
            page.goto(f"{url}/ui/")
            page.fill("#login-user", "admin")
            page.fill("#login-password", PASSWORD)
            page.click("#login-submit")
            page.click("tr.stream[data-stream=renewals]")
            page.wait_for_selector("body[data-live=following]", timeout=15_000)
            assert "straight from Azure storage" in page.inner_text("#stream-route")
            opened = _paths(log).count("/streams/renewals")
            # Each renewal is one GET /streams/renewals: wait for three.
            deadline = time.monotonic() + 30
            while _paths(log).count("/streams/renewals") < opened + 3:
                assert time.monotonic() < deadline, "the viewer never renewed its SAS URL"
                time.sleep(0.25)
            _publish(url, "renewals", [{"key": "after-renewal", "value": "still live"}])
            page.locator(".rows .row[data-sequence='5'] .key", has_text="after-renewal").wait_for(
                timeout=10_000
            )
            assert page.inner_text("#error") == ""
            # Renewing asked the server for a SAS URL; the messages never came through it.
            assert not any(path.endswith("/messages") for path in _paths(log))
        finally:
            page.close()
