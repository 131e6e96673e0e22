"""The browser viewer in a real Chromium against real servers, file storage and Azurite.

File storage is read through the server; Azure straight from storage with the
SAS URL the server hands out (the server's access log proves it is not asked),
or through the server when no CORS rule lets the page's origin read Azure;
and the page on a plain static host reads a stream from a SAS URL alone.
One file-storage server serves this module's tests on each xdist worker:
each test publishes to streams of its own.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from azure.storage.blob import BlobServiceClient

from messagevault import Writer
from messagevault.storage import FileStorage
from messagevault.storage.azure import AzureStorage
from messagevault.storage.azure_cors import cors_rules, remove_origin
from tests.azurite import Azurite, free_port
from tests.serve_process import serve_process
from tests.service_process import stop_gracefully
from tests.viewer_pages import (
    PASSWORD,
    USER,
    Sent,
    access_log_paths,
    call,
    detail_fields,
    expected_row,
    first_at_or_after,
    format_bytes,
    format_int,
    format_time,
    hex_dump,
    in_view,
    iso_ms,
    jump,
    landed_on,
    log_in,
    new_page,
    open_stream,
    publish,
    rows,
    screenshot,
    settled,
    until,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

VIEWER = Path(__file__).resolve().parent.parent / "src" / "messagevault" / "viewer"
BIG = "big-stream"
BIG_COUNT = 300_000  # past MAX_SPACER / ROW (~285,700 rows): the list scrolls by proportion
MAX_SPACER = 8_000_000  # as viewer.js
BATCHES = 5
PER_BATCH = 100
HOSTILE_KEY = '<img src=x onerror="window.__pwned=1">'
HOSTILE_VALUE = b"<script>window.__pwned=2</script>"


def big_message(sequence: int) -> tuple[str, bytes]:
    return f"k{sequence % 13}", str(sequence).encode()


@dataclass(frozen=True)
class Served:
    url: str
    root: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A server on file storage for the module, the big stream written before it starts."""
    root = tmp_path_factory.mktemp("viewer-files")
    # Straight to storage with the Writer: 300,000 messages through HTTP would take minutes.
    with Writer.open(FileStorage(root, fsync="never"), BIG) as writer:
        for start in range(0, BIG_COUNT, 50_000):
            writer.append([big_message(s) for s in range(start, start + 50_000)])
    with serve_process(root, USER, PASSWORD) as url:
        yield Served(url, root)


def varied(i: int) -> tuple[str, bytes]:
    """Message ``i`` of a varied stream: JSON, text and binary values; 13 keys and no key."""
    key = "" if i % 50 == 7 else f"customer-{i % 13}"
    if i % 3 == 0:
        note = "spaced  out\ttext" if i % 2 else "<b>bold?</b>"
        doc = {"order": i, "items": [{"sku": f"A-{i % 5}", "qty": i % 4 + 1}], "note": note}
        return key, json.dumps(doc).encode()
    if i % 3 == 1:
        return key, f"plain text line {i}\nand a second\tline".encode()
    return key, b"\x00\xff" + bytes((i * 7 + j) % 256 for j in range(20 + i % 60))


def publish_varied(url: str, stream: str) -> list[Sent]:
    """500 varied messages in 5 batches, each batch committed at a later millisecond."""
    sent: list[Sent] = []
    for batch in range(BATCHES):
        if sent:
            # Batches at distinct times, so a time falls between two of them.
            last = sent[-1].timestamp_ms
            until(lambda: _now_ms() > last + 2, "the clock to move on")  # noqa: B023
        start = batch * PER_BATCH
        sent += publish(url, stream, [varied(i) for i in range(start, start + PER_BATCH)])
    return sent


def _now_ms() -> int:
    return int(time.time() * 1000)


def check_first_and_last_screens(page: Page, sent: list[Sent]) -> None:
    """The rows shown at the start and the end are the published messages, row by row."""
    page.click("#jump-first")
    page.wait_for_selector("#rows .row[data-sequence='0']")
    first = settled(page)
    assert len(first) >= 10  # a screenful, not a row or two
    assert first == [expected_row(m) for m in sent[: len(first)]]

    page.click("#jump-last")
    page.wait_for_selector(f"#rows .row[data-sequence='{sent[-1].sequence}']")
    last = settled(page)
    assert len(last) >= 10
    assert last[-1]["sequence"] == sent[-1].sequence
    assert last == [expected_row(sent[int(str(row["sequence"]))]) for row in last]
    assert [row["sequence"] for row in last] == list(
        range(sent[-1].sequence - len(last) + 1, sent[-1].sequence + 1)
    )


# --- file storage, through the server -------------------------------------------------------


def test_login_then_the_list_shows_what_get_streams_gives(browser: Browser, served: Served) -> None:
    publish(served.url, "listed-orders", [("a", b"1"), ("b", b"22")])
    publish(served.url, "listed-logs", [("", b"x" * 3000)])
    with new_page(browser) as page:
        page.goto(f"{served.url}/ui/")
        for user, password in [(USER, "wrong-password"), ("nobody", PASSWORD)]:
            page.fill("#login-user", user)
            page.fill("#login-password", password)
            page.click("#login-submit")
            page.locator("#login-error", has_text="Unknown user or wrong password.").wait_for()
            assert page.is_hidden("#app")
            assert page.is_visible("#login")
            page.evaluate("() => { document.getElementById('login-error').textContent = ''; }")

        page.fill("#login-user", USER)
        page.fill("#login-password", PASSWORD)
        page.click("#login-submit")
        page.wait_for_selector("tr.stream[data-stream='listed-logs']")
        assert page.is_visible("#app")
        assert page.is_hidden("#welcome")
        assert page.inner_text("#login-error") == ""
        shown = page.evaluate(
            """() => Array.from(document.querySelectorAll("#streams tr.stream"), (tr) => ({
                 stream: tr.dataset.stream,
                 name: tr.querySelector(".name").textContent,
                 count: tr.querySelector(".count").textContent,
                 length: tr.querySelector(".length").textContent,
                 lastWrite: tr.querySelector(".last-write").textContent,
                 lastWriteTitle: tr.querySelector(".last-write").title,
               }))"""
        )
    streams = call(served.url, "/streams")["streams"]
    assert sorted(row["stream"] for row in shown) == sorted(s["stream"] for s in streams)
    assert {"listed-orders", "listed-logs", BIG} <= {row["stream"] for row in shown}
    for s in streams:
        (row,) = [row for row in shown if row["stream"] == s["stream"]]
        assert row["name"] == s["stream"]
        assert row["count"] == format_int(s["messages"])
        assert row["length"] == format_bytes(s["length"])
        last_write = datetime.fromisoformat(s["last_write"])
        assert datetime.fromisoformat(row["lastWriteTitle"]) == last_write
        assert row["lastWrite"].endswith(" ago")


def test_rows_show_what_was_published(browser: Browser, served: Served, tmp_path: Path) -> None:
    sent = publish_varied(served.url, "rows-orders")
    assert {value_kind for value_kind in (m.value[:1] for m in sent)} >= {b"{", b"p", b"\x00"}
    with new_page(browser) as page:
        log_in(page, served.url, "rows-orders")
        open_stream(page, "rows-orders")
        assert page.inner_text("#stream-route") == "read through the server"
        assert page.inner_text("#stream-stats").startswith("500 messages · ")
        check_first_and_last_screens(page, sent)

        page.click(f"#rows .row[data-sequence='{sent[-3].sequence}']")
        landed_on(page, sent[-3].sequence)
        screenshot(page, tmp_path / "viewer-files.png")


def test_jumps_land_on_the_message(browser: Browser, served: Served) -> None:
    stream = "jump-orders"
    sent = publish_varied(served.url, stream)
    with new_page(browser) as page:
        log_in(page, served.url, stream)
        open_stream(page, stream)

        jump(page, "sequence", "123")
        landed_on(page, 123)
        fields = detail_fields(page)
        assert fields["Key"] == (sent[123].key or "(none)")
        assert fields["Position"] == str(sent[123].position)
        assert page.inner_text("#detail-value") == json.dumps(json.loads(sent[123].value), indent=2)

        target = sent[321]
        jump(page, "position", str(target.position))
        landed_on(page, 321)
        assert detail_fields(page)["Position"] == str(target.position)

        # A time between two batches lands on the next batch's first message, as the server says.
        third = sent[2 * PER_BATCH]
        assert third.timestamp_ms > sent[2 * PER_BATCH - 1].timestamp_ms + 1
        moment = iso_ms(sent[2 * PER_BATCH - 1].timestamp_ms + 1)
        expected = first_at_or_after(served.url, stream, moment)
        assert expected == third.sequence
        jump(page, "time", moment)
        landed_on(page, expected)

        # The list's own time format (UTC, no zone) is a time the jump takes.
        fourth = sent[3 * PER_BATCH]
        jump(page, "time", format_time(fourth.timestamp_ms))
        landed_on(page, first_at_or_after(served.url, stream, iso_ms(fourth.timestamp_ms)))
        assert page.inner_text("#error") == ""


_STATE = """() => ({
  selected: document.querySelector("#rows .row.selected")?.dataset.sequence ?? null,
  scrollTop: document.getElementById("messages").scrollTop,
  hash: location.hash,
  detail: document.getElementById("detail-fields").textContent,
  shown: Array.from(document.querySelectorAll("#rows .row"), (r) => r.dataset.sequence),
})"""


def test_bad_jumps_change_nothing_and_say_why(browser: Browser, served: Served) -> None:
    stream = "badjump-orders"
    sent = publish_varied(served.url, stream)
    length = call(served.url, f"/streams/{stream}")["length"]
    inside = sent[5].position + 1  # inside message 5's frame: not a message's position
    bad = [
        ("sequence", "500", "no sequence 500: the stream holds 0 to 499"),
        ("sequence", "-3", 'a sequence must be a whole number, not "-3"'),
        ("sequence", "12abc", 'a sequence must be a whole number, not "12abc"'),
        ("sequence", "  ", "type a sequence to jump to"),
        ("position", str(inside), f"position {inside} is not the position of a message"),
        ("position", str(length), f"position {format_int(length)} is at or past the end"),
        ("position", "1e3", 'a position must be a whole number, not "1e3"'),
        ("time", "next tuesday", '"next tuesday" is not a time'),
        ("time", "2026-13-45T99:00:00Z", '"2026-13-45T99:00:00Z" is not a time'),
    ]
    with new_page(browser) as page:
        log_in(page, served.url, stream)
        open_stream(page, stream)
        jump(page, "sequence", "250")
        landed_on(page, 250)
        before = page.evaluate(_STATE)
        for kind, value, says in bad:
            jump(page, kind, value)
            page.locator("#error", has_text=says).wait_for()
            # The reason alone: not the request URL the JS reader's message starts with.
            assert "http" not in page.inner_text("#error"), page.inner_text("#error")
            assert page.evaluate(_STATE) == before, (kind, value)
            page.evaluate("() => { document.getElementById('error').textContent = ''; }")
        # And a good jump still works after them all, and clears the last reason.
        jump(page, "sequence", "12abc")
        page.locator("#error", has_text="a sequence must be a whole number").wait_for()
        jump(page, "sequence", "7")
        landed_on(page, 7)
        assert page.inner_text("#error") == ""
        # As do the first and last buttons.
        for button, sequence in (("#jump-last", 499), ("#jump-first", 0)):
            jump(page, "time", "next tuesday")
            page.locator("#error", has_text="is not a time").wait_for()
            page.click(button)
            until(lambda: page.inner_text("#error") == "", f"{button} to clear the reason")
            until(lambda s=sequence: in_view(page, f"#rows .row[data-sequence='{s}']"), button)


def test_key_filter_shows_only_matching_rows(browser: Browser, served: Served) -> None:
    stream = "filter-orders"
    sent = publish_varied(served.url, stream)
    with new_page(browser) as page:
        log_in(page, served.url, stream)
        open_stream(page, stream)
        for text in ["customer-1", "er-12", "no such key"]:
            matching = [m for m in sent if text in m.key]  # customer-1 also matches 10, 11, 12
            page.fill("#filter-key", text)
            page.locator(
                "#status", has_text=f'key contains "{text}": {len(matching)} of 500 messages'
            ).wait_for()
            assert page.inner_text("#status") == (
                f'key contains "{text}": {len(matching)} of 500 messages'
            )
            shown = rows(page)
            if not matching:
                assert shown == []
                continue
            assert shown, text
            assert all(text in str(row["key"]) for row in shown)
            # The rows are the first matches, in order (the filter starts at the top).
            page.evaluate("() => { document.getElementById('messages').scrollTop = 0; }")
            first = matching[0].sequence
            top = until(lambda: _starting(page, first), "the first match on top")  # noqa: B023
            assert top == [expected_row(m) for m in matching[: len(top)]]
        page.fill("#filter-key", "")
        page.wait_for_selector(f"#rows .row[data-sequence='{sent[-1].sequence}']")


def _starting(page: Page, sequence: int) -> list[dict[str, object]] | None:
    """The rows shown, once the first of them is ``sequence``."""
    shown = rows(page)
    return shown if shown and shown[0]["sequence"] == sequence else None


def test_live_shows_a_new_message(browser: Browser, served: Served) -> None:
    stream = "live-orders"
    publish(served.url, stream, [varied(i) for i in range(40)])
    with new_page(browser) as page:
        log_in(page, served.url, stream)
        open_stream(page, stream)
        assert page.is_checked("#tail")  # Live is on when a stream opens
        delays = []
        for n in range(3):
            (fresh,) = publish(served.url, stream, [(f"fresh-{n}", b'{"live": true}')])
            published = time.monotonic()
            page.wait_for_selector(f"#rows .row[data-sequence='{fresh.sequence}']", timeout=10_000)
            delays.append(time.monotonic() - published)
            row = page.locator(f"#rows .row[data-sequence='{fresh.sequence}']")
            assert row.locator(".key").inner_text() == f"fresh-{n}"
            assert in_view(page, f"#rows .row[data-sequence='{fresh.sequence}']")
        print(f"Live delay, file storage through the server: {[f'{d:.3f} s' for d in delays]}")
        assert page.inner_text("#stream-stats").startswith("43 messages")

        # Live off: a message published meanwhile does not appear until asked for.
        page.uncheck("#tail")
        until(lambda: page.evaluate("() => !document.body.dataset.live"), "Live to stop")
        (unseen,) = publish(served.url, stream, [("quiet", b"1")])
        page.click("#jump-last")
        assert page.query_selector(f"#rows .row[data-sequence='{unseen.sequence}']") is None
        page.check("#tail")  # on again: it catches up
        page.wait_for_selector(f"#rows .row[data-sequence='{unseen.sequence}']")


def test_detail_shows_json_text_and_bytes(browser: Browser, served: Served) -> None:
    stream = "detail-values"
    doc = {"order": 7, "items": [{"sku": "A-1", "qty": 2}], "ok": True, "note": None, "tags": []}
    text = "first line\n  second line, indented\tand tabbed"
    every_byte = bytes(range(256))
    publish(
        served.url,
        stream,
        [("doc", json.dumps(doc).encode()), ("text", text.encode()), ("bytes", every_byte)],
    )
    pretty = json.dumps(doc, indent=2)
    with new_page(browser) as page:
        log_in(page, served.url, stream)
        open_stream(page, stream)

        def show(sequence: int, mode: str) -> str:
            page.click(f"#rows .row[data-sequence='{sequence}']")
            landed_on(page, sequence)
            page.select_option("#detail-mode", mode)  # the pane shows the value again, so
            return page.inner_text("#detail-value")

        assert show(0, "auto") == pretty
        assert page.locator("#detail-value span.k", has_text='"order"').count() == 1
        assert show(0, "json") == pretty
        assert show(0, "text") == json.dumps(doc)
        assert show(1, "auto") == text
        assert show(1, "text") == text
        assert show(1, "json").startswith("Not JSON: ")
        assert show(2, "auto") == hex_dump(every_byte)
        assert show(2, "hex") == hex_dump(every_byte)
        assert hex_dump(every_byte).splitlines()[0] == (
            "00000000  00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f  |................|"
        )
        assert detail_fields(page)["Size"] == "256 bytes"
        assert show(0, "hex").startswith("00000000  7b 22 6f 72 64 65 72 22")  # {"order"


def test_hostile_keys_and_values_are_shown_as_text(browser: Browser, served: Served) -> None:
    stream = "hostile-data"
    publish(
        served.url,
        stream,
        [
            (HOSTILE_KEY, HOSTILE_VALUE),
            ("<script>window.__pwned=3</script>", HOSTILE_KEY.encode()),
            ("plain", json.dumps({"<img src=x onerror=window.__pwned=4>": HOSTILE_KEY}).encode()),
        ],
    )
    with new_page(browser) as page:
        log_in(page, served.url, stream)
        open_stream(page, stream)
        shown = {row["sequence"]: row for row in settled(page)}
        assert shown[0]["key"] == HOSTILE_KEY
        assert shown[0]["preview"] == HOSTILE_VALUE.decode()
        assert shown[1]["preview"] == HOSTILE_KEY
        for sequence in range(3):
            page.click(f"#rows .row[data-sequence='{sequence}']")
            landed_on(page, sequence)
            for mode in ["auto", "json", "text", "hex"]:
                page.select_option("#detail-mode", mode)
        page.click("#rows .row[data-sequence='0']")
        landed_on(page, 0)
        page.select_option("#detail-mode", "text")
        assert detail_fields(page)["Key"] == HOSTILE_KEY
        assert page.inner_text("#detail-value") == HOSTILE_VALUE.decode()
        assert page.evaluate("() => window.__pwned") is None
        assert (
            page.evaluate(
                "() => document.querySelectorAll("
                "'#rows img, #detail img, #rows script, #detail script').length"
            )
            == 0
        )


def test_a_big_stream_scrolls_by_proportion(browser: Browser, served: Served) -> None:
    # A view of 22.5 rows: a last screen that were not aligned to the bottom would cut the
    # newest row in half.
    with new_page(browser, height=807) as page:
        log_in(page, served.url, BIG)
        open_stream(page, BIG)
        assert page.inner_text("#stream-stats").startswith(f"{format_int(BIG_COUNT)} messages")
        assert page.evaluate("() => document.getElementById('messages').clientHeight") % 28 == 14
        spacer = page.evaluate("() => document.getElementById('spacer').offsetHeight")
        assert spacer == MAX_SPACER  # scaled: 300,000 rows of 28 px would not fit
        until(
            lambda: in_view(page, f"#rows .row[data-sequence='{BIG_COUNT - 1}']"),
            "the last row in view",
        )
        last = settled(page)
        assert last[-1]["sequence"] == BIG_COUNT - 1

        for sequence in [250_000, 123_457, 285_714, 1, BIG_COUNT - 1, 0]:
            jump(page, "sequence", str(sequence))
            landed_on(page, sequence)
            assert detail_fields(page)["Key"] == big_message(sequence)[0]
            assert page.inner_text("#detail-value") == str(sequence)
            shown = settled(page)
            first = int(str(shown[0]["sequence"]))
            assert [row["sequence"] for row in shown] == list(range(first, first + len(shown)))
            assert [row["key"] for row in shown] == [
                big_message(int(str(r["sequence"])))[0] for r in shown
            ]

        page.click("#jump-last")
        page.wait_for_selector(f"#rows .row[data-sequence='{BIG_COUNT - 1}']")
        until(
            lambda: in_view(page, f"#rows .row[data-sequence='{BIG_COUNT - 1}']"),
            "the last row in view",
        )
        # Half way down the scrollbar is half way through the stream.
        page.evaluate(
            """() => { const s = document.getElementById("messages");
                       s.scrollTop = (s.scrollHeight - s.clientHeight) / 2; }"""
        )
        middle = until(
            lambda: (
                (r := settled(page))
                and abs(int(str(r[0]["sequence"])) - BIG_COUNT // 2) < 100
                and r
            ),
            "the middle rows",
        )
        assert middle


# --- Azure, straight from storage -------------------------------------------------------


def _service(azurite: Azurite) -> BlobServiceClient:
    return BlobServiceClient.from_connection_string(azurite.connection_string)


def test_azure_is_read_straight_from_storage_and_costs_the_server_nothing(
    browser: Browser, azurite: Azurite, azure_storage: AzureStorage, tmp_path: Path
) -> None:
    direct, fallback = "azure-direct", "azure-fallback"
    log = tmp_path / "server.log"
    with serve_process(
        tmp_path, USER, PASSWORD, storage=f"azure:{azurite.connection_string}", log=log
    ) as url:
        azurite.allow_origin(url)
        try:
            sent: list[Sent] = []
            for batch in range(3):
                sent += publish(
                    url, direct, [varied(i) for i in range(batch * 100, batch * 100 + 100)]
                )
            fallback_sent = publish(url, fallback, [varied(i) for i in range(30)])
            with new_page(browser) as page:
                log_in(page, url, direct)
                open_stream(page, direct)
                assert page.inner_text("#stream-route") == "read straight from Azure storage"
                check_first_and_last_screens(page, sent)
                jump(page, "sequence", "42")
                landed_on(page, 42)
                assert detail_fields(page)["Key"] == (sent[42].key or "(none)")
                before = page.evaluate(_STATE)
                inside = sent[5].position + 1  # inside a frame: the JS reader refuses it itself
                jump(page, "position", str(inside))
                page.locator(
                    "#error", has_text=f"{inside} is not the position of a message"
                ).wait_for()
                assert page.evaluate(_STATE) == before

                page.click("#jump-last")
                (fresh,) = publish(url, direct, [("fresh-one", b'{"x": 1}')])
                published = time.monotonic()
                page.wait_for_selector(
                    f"#rows .row[data-sequence='{fresh.sequence}']", timeout=10_000
                )
                print(
                    f"Live delay, Azure straight from storage: {time.monotonic() - published:.3f} s"
                )
                assert (
                    page.locator(f"#rows .row[data-sequence='{fresh.sequence}'] .key").inner_text()
                    == "fresh-one"
                )
                page.click(f"#rows .row[data-sequence='{fresh.sequence}']")
                landed_on(page, fresh.sequence)
                screenshot(page, tmp_path / "viewer-azure.png")
        finally:
            assert remove_origin(_service(azurite), url) == 1

        # No CORS rule for the page's origin now: the server reads the stream for it.
        with new_page(browser) as page:
            log_in(page, url, fallback)
            open_stream(page, fallback)
            assert page.inner_text("#stream-route").startswith("read through the server")
            assert "no CORS rule" in page.inner_text("#stream-route")
            shown = settled(page)
            assert shown[-1]["sequence"] == 29
            assert shown == [expected_row(fallback_sent[int(str(r["sequence"]))]) for r in shown]
    paths = access_log_paths(log)
    assert f"/streams/{direct}" in paths  # the page did open it, through the server's info
    assert [p for p in paths if p.startswith(f"/streams/{direct}/")] == []
    assert any(p.startswith(f"/streams/{fallback}/messages") for p in paths)


@contextlib.contextmanager
def static_server(folder: Path) -> Iterator[str]:
    """Python's plain static file server on ``folder``: no MessageVault anywhere."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            str(port),
            "--directory",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        until(lambda: _answers(f"{url}/index.html"), "the static server to start", timeout=30)
        yield url
    finally:
        stop_gracefully(process, timeout=30)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False


def test_standalone_page_reads_azure_from_a_sas_url_alone(
    browser: Browser, azurite: Azurite, azure_storage: AzureStorage
) -> None:
    stream = "standalone-orders"
    messages = [varied(i) for i in range(60)]
    with Writer.open(azure_storage, stream) as writer:
        result = writer.append(messages)
        sas = writer.read_access().location
    sent = [
        Sent(r.sequence, r.position, result.timestamp, key, value)
        for r, (key, value) in zip(result, messages, strict=True)
    ]
    forged = sas.replace("sig=", "sig=AAAA")
    with static_server(VIEWER) as origin:
        azurite.allow_origin(origin)
        try:
            with new_page(browser) as page:
                page.goto(f"{origin}/index.html#sas={sas}")
                page.locator("#stream-title", has_text=stream).wait_for()
                assert page.inner_text("#stream-route") == "read straight from Azure storage"
                shown = settled(page)
                assert shown[-1]["sequence"] == 59
                assert shown == [expected_row(sent[int(str(r["sequence"]))]) for r in shown]
                jump(page, "sequence", "3")
                landed_on(page, 3)

            with new_page(browser) as page:
                page.goto(f"{origin}/index.html")
                page.locator("#connection", has_text="no MessageVault server here").wait_for()
                assert page.is_hidden("#login")
                container = sas.split("?")[0]
                for text, says in [
                    ("not a url", "paste the whole SAS URL"),
                    (container, "this URL has no SAS signature (sig=)"),
                    (
                        sas.replace(f"/mv-{stream}?", "/orders?"),
                        '"orders" is not a MessageVault stream container',
                    ),
                    ("ftp://example.com/mv-x?sig=1", "a SAS URL starts https://"),
                    (forged, "403"),  # well formed, refused by storage
                ]:
                    page.fill("#sas-url", text)
                    page.click("#sas-open")
                    page.locator("#sas-error", has_text=says).wait_for()
                    assert page.is_hidden("#app")
                page.fill("#sas-url", sas)
                page.click("#sas-open")
                page.locator("#stream-title", has_text=stream).wait_for()
                assert page.inner_text("#sas-error") == ""
                assert settled(page)[-1]["sequence"] == 59
        finally:
            assert remove_origin(_service(azurite), origin) == 1
    assert origin not in {o for rule in cors_rules(_service(azurite)) for o in rule.origins}
