"""Driving the browser viewer (src/messagevault/viewer) and knowing what it should show.

The expectations (sizes, previews, hex dumps) restate viewer.js's formatting
in Python, from what was published, so a row is checked against the data
and not against another reading of the page.

The page's CSP forbids eval, so Playwright's ``wait_for_function`` with a
string cannot run there: waits are selectors, locators, or ``until`` below,
which polls ``page.evaluate`` (that runs over CDP, outside the CSP).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

USER = "admin"
PASSWORD = "pw-viewer-123"
WAIT_MS = 15_000  # an upper bound for "it happens at all", never a speed claim
PREVIEW_BYTES = 512  # as viewer.js
DETAIL_WHITESPACE = re.compile(r"\s+")
# Set to a folder to keep the screenshots past a passing run (pytest drops its tmp_path then).
SCREENSHOTS_ENV = "MESSAGEVAULT_SCREENSHOTS"

T = TypeVar("T")


# --- the server's HTTP API, as any client calls it ------------------------------------------


def authorization(user: str = USER, password: str = PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def call(url: str, path: str, body: object | None = None) -> Any:
    """A JSON request to the server as the admin: GET, or POST with ``body``."""
    request = urllib.request.Request(
        url + path,
        data=None if body is None else json.dumps(body).encode(),
        method="GET" if body is None else "POST",
        headers={"Authorization": authorization(), "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)


@dataclass(frozen=True)
class Sent:
    """One published message: what went in and where the server put it."""

    sequence: int
    position: int
    timestamp_ms: int  # from the message id: its first 6 bytes are the commit time
    key: str
    value: bytes


def record(key: str, value: bytes) -> dict[str, str]:
    """The JSON append body's form of one message (values as base64: any bytes travel)."""
    return {"key": key, "value": base64.b64encode(value).decode(), "encoding": "base64"}


def publish(url: str, stream: str, messages: list[tuple[str, bytes]]) -> list[Sent]:
    """Append ``messages`` as one batch; what each became."""
    answer = call(url, f"/streams/{stream}", {"messages": [record(k, v) for k, v in messages]})
    return [
        Sent(r["sequence"], r["position"], int(r["id"][:12], 16), key, value)
        for r, (key, value) in zip(answer["messages"], messages, strict=True)
    ]


def first_at_or_after(url: str, stream: str, moment: str) -> int:
    """The sequence the server's read from a time starts at."""
    query = urllib.parse.urlencode({"from_time": moment, "limit": 1})
    (message,) = call(url, f"/streams/{stream}/messages?{query}")["messages"]
    return int(message["sequence"])


# --- what viewer.js shows ---------------------------------------------------------------


def format_int(n: int) -> str:
    return f"{n:,}"


def _fixed(value: float, digits: int) -> str:
    # JavaScript's toFixed rounds the double's exact value half up; Python's format, half even.
    return str(Decimal(value).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def format_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    units = ["KiB", "MiB", "GiB", "TiB"]
    value = float(n)
    unit = -1
    while value >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    return f"{_fixed(value, 0 if value >= 100 else 1)} {units[unit]}"


def format_time(ms: int) -> str:
    """The list's time cell: UTC, milliseconds, no T or Z."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


_JSON_START = re.compile(r"^\s*[\[{\"\d\-tfn]")
_UNPRINTABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def value_kind(value: bytes) -> str:
    """empty, binary, json or text, decided as viewer.js's valueKind does."""
    if not value:
        return "empty"
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return "binary"
    if _UNPRINTABLE.search(text):
        return "binary"
    if _JSON_START.match(text):
        try:
            json.loads(text)
        except ValueError:
            return "text"
        return "json"
    return "text"


def preview(value: bytes) -> str:
    kind = value_kind(value)
    if kind == "empty":
        return "(empty)"
    head = value[:PREVIEW_BYTES]
    if kind == "binary":
        return "0x" + head[:48].hex() + ("…" if len(value) > 48 else "")
    text = head.decode("utf-8", errors="replace")
    if kind == "json" and len(value) <= PREVIEW_BYTES:
        text = json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)
    return DETAIL_WHITESPACE.sub(" ", text)


def expected_row(m: Sent) -> dict[str, object]:
    return {
        "sequence": m.sequence,
        "position": m.position,
        "seq": format_int(m.sequence),
        "time": format_time(m.timestamp_ms),
        "key": m.key or "no key",
        "size": format_bytes(len(m.value)),
        "preview": preview(m.value),
    }


def hex_dump(data: bytes) -> str:
    lines = []
    for at in range(0, len(data), 16):
        row = data[at : at + 16]
        hexes = " ".join(f"{b:02x}" for b in row)
        ascii_ = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in row)
        lines.append(f"{at:08x}  {hexes:<47}  |{ascii_}|")
    return "\n".join(lines)


# --- the page ----------------------------------------------------------------------------


def until(check: Callable[[], T | None], what: str, timeout: float = WAIT_MS / 1000) -> T:
    """Poll ``check`` until it answers something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        answer = check()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def new_page(browser: Browser, height: int = 820) -> Iterator[Page]:
    """A page in a context of its own (own storage, own CORS cache), closed on exit.

    Script errors on the page fail the test: a viewer that throws is broken even
    if the assertions happened to pass.
    """
    context = browser.new_context(viewport={"width": 1400, "height": height})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"the page threw: {errors}"


def log_in(page: Page, url: str, stream: str) -> None:
    """Open the viewer on ``url`` and log in as the admin; wait for ``stream`` in the list."""
    page.goto(f"{url}/ui/")
    page.fill("#login-user", USER)
    page.fill("#login-password", PASSWORD)
    page.click("#login-submit")
    page.wait_for_selector(f"tr.stream[data-stream='{stream}']")


def open_stream(page: Page, stream: str) -> None:
    """Click ``stream`` in the list; wait until it is open, on its newest messages, and Live."""
    page.click(f"tr.stream[data-stream='{stream}']")
    page.locator("#stream-title", has_text=stream).wait_for()
    page.wait_for_selector("body[data-live=following]")
    settled(page)


_ROWS = """() => Array.from(document.querySelectorAll("#rows .row[data-sequence]"), (r) => ({
  sequence: Number(r.dataset.sequence),
  position: Number(r.dataset.position),
  seq: r.querySelector(".seq").textContent,
  time: r.querySelector(".time").textContent,
  key: r.querySelector(".key").textContent,
  size: r.querySelector(".size").textContent,
  preview: r.querySelector(".preview").textContent,
}))"""


def rows(page: Page) -> list[dict[str, object]]:
    """The rows the list has in the DOM now (the visible ones), top to bottom."""
    return list(page.evaluate(_ROWS))


def settled(page: Page) -> list[dict[str, object]]:
    """The rows once none is still loading (placeholders gone, at least one row)."""
    return until(
        lambda: (
            page.evaluate(
                "() => !document.querySelector('#rows .row.loading')"
                " && document.querySelectorAll('#rows .row[data-sequence]').length > 0"
            )
            and rows(page)
        ),
        "the list's rows to load",
    )


def in_view(page: Page, selector: str) -> bool:
    """Is the element inside the message list's visible area (not just in the DOM)?"""
    return bool(
        page.evaluate(
            """(selector) => {
              const element = document.querySelector(selector);
              if (!element) return false;
              const box = element.getBoundingClientRect();
              const view = document.getElementById("messages").getBoundingClientRect();
              return box.height > 0 && box.top >= view.top - 1 && box.bottom <= view.bottom + 1;
            }""",
            selector,
        )
    )


def detail_fields(page: Page) -> dict[str, str]:
    """The detail pane's fields (Sequence, Position, Key, ...) as shown."""
    return dict(
        page.evaluate(
            """() => Array.from(document.querySelectorAll("#detail-fields dt"),
                 (dt) => [dt.textContent, dt.nextElementSibling.textContent])"""
        )
    )


def jump(page: Page, kind: str, value: str) -> None:
    page.select_option("#jump-kind", kind)
    page.fill("#jump-value", value)
    page.click("#jump-go")


def landed_on(page: Page, sequence: int) -> None:
    """After a jump: the row is selected, in view, and the detail pane shows that message."""
    selector = f"#rows .row.selected[data-sequence='{sequence}']"
    page.wait_for_selector(selector)
    until(lambda: in_view(page, selector), f"row {sequence} to be in view")
    try:
        until(
            lambda: (
                page.is_visible("#detail")
                and detail_fields(page).get("Sequence") == format_int(sequence)
            ),
            f"the detail pane to show message {sequence}",
        )
    except AssertionError as failed:
        shows = detail_fields(page) if page.is_visible("#detail") else "nothing (hidden)"
        error = page.inner_text("#error")
        raise AssertionError(f"{failed}; it shows {shows}; #error: {error}") from None


def screenshot(page: Page, path: Path) -> Path:
    """Save the page to ``path`` (and to $MESSAGEVAULT_SCREENSHOTS, kept after a passing run)."""
    page.screenshot(path=str(path))
    keep = os.environ.get(SCREENSHOTS_ENV)
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)
    print(f"screenshot: {path}")
    return path


def access_log_paths(log: Path) -> list[str]:
    """The request paths of the server's access log lines (its JSON log on stderr)."""
    paths = []
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("logger") == "messagevault.access":
            paths.append(str(entry["path"]))
    return paths
