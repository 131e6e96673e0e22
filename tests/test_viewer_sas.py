"""The viewer left open on an Azure stream: its SAS URL is renewed before it expires, Live goes on.

A SAS URL the server hands out expires (an hour by default). A viewer left
open on a stream, following it, must ask the server for a new one before
then and carry on, or it would stop with an error after an hour. Here the
server hands out SAS URLs that expire after 122 s, so the viewer (which
renews 120 s before expiry) renews every couple of seconds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from tests.azurite import Azurite
from tests.serve_process import serve_process
from tests.viewer_pages import (
    PASSWORD,
    USER,
    access_log_paths,
    log_in,
    new_page,
    open_stream,
    publish,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser

SHORT_SAS = """
import datetime, runpy, sys
from messagevault.storage.azure import AzureStorage
AzureStorage.__init__.__kwdefaults__["sas_expiry"] = datetime.timedelta(seconds=122)
sys.argv[0] = "messagevault"
runpy.run_module("messagevault.cli", run_name="__main__")
"""


def test_a_viewer_following_an_azure_stream_renews_its_sas_and_goes_on(
    browser: Browser, azurite: Azurite, tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    with serve_process(
        tmp_path,
        USER,
        PASSWORD,
        storage=f"azure:{azurite.connection_string}",
        log=log,
        launcher=("-c", SHORT_SAS),
    ) as url:
        azurite.allow_origin(url)
        publish(url, "renewals", [(f"k{i}", f"v{i}".encode()) for i in range(5)])
        with new_page(browser) as page:
            log_in(page, url, "renewals")
            open_stream(page, "renewals")
            assert "straight from Azure storage" in page.inner_text("#stream-route")
            opened = access_log_paths(log).count("/streams/renewals")
            # Each renewal is one GET /streams/renewals: wait for three.
            deadline = time.monotonic() + 30
            while access_log_paths(log).count("/streams/renewals") < opened + 3:
                assert time.monotonic() < deadline, "the viewer never renewed its SAS URL"
                time.sleep(0.25)
            publish(url, "renewals", [("after-renewal", b"still live")])
            page.locator(".rows .row[data-sequence='5'] .key", has_text="after-renewal").wait_for(
                timeout=10_000
            )
            assert page.inner_text("#error") == ""
            # Renewing asked the server for a SAS URL; the messages never came through it.
            assert not any(path.endswith("/messages") for path in access_log_paths(log))
