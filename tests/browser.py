"""A real headless Chromium, driven by Playwright for Python, for the browser tests.

Debian's ``chromium`` package is the browser (``make test`` installs it when it
can): ``playwright install`` downloads Playwright's own builds, which cannot
work on the machines these tests run on. Without Chromium or Playwright the
browser tests skip, naming what is missing, except on CI (``CI`` set), where a
skip would hide them: there they fail.

Playwright's sync API refuses to run inside a running asyncio loop, so browser
tests are plain (sync) tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser

EXECUTABLES = ("chromium", "chromium-browser")


def chromium_path() -> str | None:
    """Debian's Chromium on PATH, or None."""
    for name in EXECUTABLES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _missing(what: str) -> None:
    reason = f"{what}: `make test` installs it"
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the browser tests must run, not skip)")
    pytest.skip(reason)


@contextlib.contextmanager
def open_browser() -> Iterator[Browser]:
    """A headless Chromium for the block; closed, with Playwright's driver, on exit."""
    executable = chromium_path()
    if executable is None:
        _missing("no Chromium on PATH (Debian package chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright for Python is not installed (the test extra)")
    assert executable is not None
    with sync_playwright() as playwright:
        # --no-sandbox: the test machines run as root, where Chromium's sandbox will not start.
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True, args=["--no-sandbox"]
        )
        try:
            yield browser
        finally:
            browser.close()
