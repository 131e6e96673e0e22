"""The browser harness itself: a broken one fails here, loudly, not as a confusing viewer test."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Browser

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_a_page_runs_script_and_is_screenshotted(browser: Browser, tmp_path: Path) -> None:
    page = browser.new_page()
    try:
        page.set_content(
            "<title>harness</title><p id=out>waiting</p>"
            "<script>document.getElementById('out').textContent = String(6 * 7);</script>"
        )
        assert page.inner_text("#out") == "42"  # the page's script ran
        assert page.evaluate("() => [1, 2, 3].map((n) => n * 2)") == [2, 4, 6]
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot))
    finally:
        page.close()
    data = shot.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 100  # an image, not just a header
