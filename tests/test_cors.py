"""``messagevault cors`` and storage/azure_cors.py on a real Azurite, and what browsers then get.

The CORS rules are the Blob service's, shared by every test on the worker's
Azurite: each test here starts and ends with none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.server
import json
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from azure.storage.blob import BlobServiceClient, CorsRule
from click.testing import CliRunner

from messagevault import Writer
from messagevault.cli import main
from messagevault.storage.azure import AzureStorage
from messagevault.storage.azure_cors import (
    EXPOSED_HEADERS,
    MAX_RULES,
    allow_origin,
    cors_rules,
    validate_origin,
    viewer_rule,
)
from tests.azurite import Azurite, free_port

if TYPE_CHECKING:
    from playwright.sync_api import Browser

ROOT = Path(__file__).resolve().parent.parent
VIEWER = "https://viewer.example"
OTHER = "https://other.example"
BAD_ORIGINS = [
    "https://viewer.example/path",
    "https://viewer.example/",  # a browser's Origin never ends in /
    "viewer.example",
    "//viewer.example",
    "ftp://viewer.example",
    "",
    "https://viewer.example?query=1",
    "https://viewer.example#top",
    "https://user@viewer.example",
    "https://viewer.example:99999",
    "https://a.example,https://b.example",
    "http://",
]


@pytest.fixture
def service(azurite: Azurite) -> Iterator[BlobServiceClient]:
    client = BlobServiceClient.from_connection_string(azurite.connection_string)
    client.set_service_properties(cors=[])
    yield client
    client.set_service_properties(cors=[])


def _run(storage: str | None, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(
        main,
        ["cors", *args],
        env={"MESSAGEVAULT_STORAGE": storage, "MESSAGEVAULT_URL": None},
        prog_name="messagevault",
    )
    return result.exit_code, result.stdout, result.stderr


def _one_line_error(err: str) -> str:
    assert err.startswith("error: "), err
    assert err.count("\n") == 1, err
    return err


def _rule_of(origins: list[str], methods: list[str]) -> CorsRule:
    return CorsRule(origins, methods, allowed_headers=["x-custom"], max_age_in_seconds=60)


def test_allow_show_remove(azurite: Azurite, service: BlobServiceClient) -> None:
    storage = f"azure:{azurite.connection_string}"
    code, out, _ = _run(storage, "--format", "text")
    assert code == 0
    assert "no CORS rules" in out

    code, out, err = _run(storage, "allow", VIEWER)
    assert (code, err) == (0, "")
    assert out.startswith(f"added the rule for {VIEWER}")
    assert cors_rules(service) == [viewer_rule(VIEWER)]

    code, out, _ = _run(storage)  # piped: one JSON line a rule
    assert code == 0
    assert [json.loads(line) for line in out.splitlines()] == [
        {
            "origins": [VIEWER],
            "methods": ["GET", "HEAD", "OPTIONS"],
            "allowed_headers": ["range", "x-ms-*"],
            "exposed_headers": list(EXPOSED_HEADERS),
            "max_age_seconds": 3600,
        }
    ]
    code, out, _ = _run(storage, "--format", "text")
    assert code == 0
    assert out.splitlines()[:2] == [
        f"rule 1 of 1: {VIEWER}",
        "  methods          GET, HEAD, OPTIONS",
    ]

    code, out, err = _run(storage, "remove", VIEWER)
    assert (code, out, err) == (0, f"removed {VIEWER}\n", "")
    assert cors_rules(service) == []


def test_allow_is_idempotent(azurite: Azurite, service: BlobServiceClient) -> None:
    storage = f"azure:{azurite.connection_string}"
    assert _run(storage, "allow", VIEWER)[0] == 0
    code, out, _ = _run(storage, "allow", "HTTPS://Viewer.Example:443")  # the same origin
    assert code == 0
    assert out == f"{VIEWER} was already allowed: nothing changed\n"
    assert allow_origin(service, VIEWER) == "unchanged"
    assert cors_rules(service) == [viewer_rule(VIEWER)]


def test_the_storage_can_come_from_a_file(
    azurite: Azurite, service: BlobServiceClient, tmp_path: Path
) -> None:
    """As other storage commands take it: no account key on the command line."""
    secret = tmp_path / "storage"
    secret.write_text(f"azure:{azurite.connection_string}\n")
    code, _, err = _run(None, "allow", VIEWER, "--storage-file", str(secret))
    assert (code, err) == (0, "")
    assert cors_rules(service) == [viewer_rule(VIEWER)]


def test_allow_and_remove_keep_other_origins_rules(
    azurite: Azurite, service: BlobServiceClient
) -> None:
    storage = f"azure:{azurite.connection_string}"
    service.set_service_properties(cors=[_rule_of([OTHER], ["PUT"])])
    (theirs,) = cors_rules(service)

    assert _run(storage, "allow", VIEWER)[0] == 0
    assert cors_rules(service) == [theirs, viewer_rule(VIEWER)]
    assert _run(storage, "remove", VIEWER)[0] == 0
    assert cors_rules(service) == [theirs]


def test_allow_replaces_an_outdated_rule_for_the_origin_where_it_stood(
    azurite: Azurite, service: BlobServiceClient
) -> None:
    """A rule for the origin alone that lacks what the viewer needs is made the viewer's."""
    storage = f"azure:{azurite.connection_string}"
    service.set_service_properties(cors=[_rule_of([VIEWER], ["GET"]), _rule_of([OTHER], ["GET"])])
    theirs = cors_rules(service)[1]
    code, out, _ = _run(storage, "allow", VIEWER)
    assert code == 0
    assert out.startswith(f"updated the rule for {VIEWER}")
    assert cors_rules(service) == [viewer_rule(VIEWER), theirs]


def test_remove_takes_the_origin_out_of_a_shared_rule(
    azurite: Azurite, service: BlobServiceClient
) -> None:
    storage = f"azure:{azurite.connection_string}"
    service.set_service_properties(cors=[_rule_of([OTHER, VIEWER], ["GET"])])
    (shared,) = cors_rules(service)
    assert _run(storage, "remove", VIEWER)[0] == 0
    assert cors_rules(service) == [dataclasses.replace(shared, origins=(OTHER,))]


def test_removing_an_origin_no_rule_names_is_an_error(
    azurite: Azurite, service: BlobServiceClient
) -> None:
    storage = f"azure:{azurite.connection_string}"
    service.set_service_properties(cors=[_rule_of([OTHER], ["GET"])])
    before = cors_rules(service)
    code, out, err = _run(storage, "remove", VIEWER)
    assert (code, out) == (1, "")
    assert f"no CORS rule names {VIEWER}: nothing changed" in _one_line_error(err)
    assert cors_rules(service) == before


@pytest.mark.parametrize("action", ["allow", "remove"])
@pytest.mark.parametrize("origin", BAD_ORIGINS)
def test_a_bad_origin_is_refused_and_changes_nothing(
    azurite: Azurite, service: BlobServiceClient, action: str, origin: str
) -> None:
    storage = f"azure:{azurite.connection_string}"
    service.set_service_properties(cors=[_rule_of([VIEWER], ["GET"])])
    before = cors_rules(service)
    code, out, err = _run(storage, action, origin)
    assert (code, out) == (2, "")
    assert "origin" in _one_line_error(err).lower()
    assert "scheme://host[:port]" in err or "give one origin" in err or "longer" in err
    assert cors_rules(service) == before


@pytest.mark.parametrize(
    ("given", "origin"),
    [
        ("https://viewer.example", "https://viewer.example"),
        ("HTTPS://Viewer.Example", "https://viewer.example"),
        ("https://viewer.example:443", "https://viewer.example"),  # a browser leaves it out
        ("http://viewer.example:80", "http://viewer.example"),
        ("http://localhost:8080", "http://localhost:8080"),
        ("http://127.0.0.1:5173", "http://127.0.0.1:5173"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("*", "*"),
    ],
)
def test_origins_are_taken_as_browsers_send_them(given: str, origin: str) -> None:
    assert validate_origin(given) == origin


@pytest.mark.parametrize("origin", BAD_ORIGINS)
def test_validate_origin_refuses_in_one_line(origin: str) -> None:
    with pytest.raises(ValueError, match="origin") as caught:
        validate_origin(origin)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("storage", ["file:{tmp}/data", "{tmp}/data", "memory:"])
@pytest.mark.parametrize("args", [(), ("allow", VIEWER), ("remove", VIEWER)])
def test_file_and_memory_storage_are_refused(
    tmp_path: Path, storage: str, args: tuple[str, ...]
) -> None:
    code, out, err = _run(storage.format(tmp=tmp_path), *args)
    assert (code, out) == (2, "")
    assert "CORS rules are for Azure storage" in _one_line_error(err)
    assert "reads through the server" in err
    assert not (tmp_path / "data").exists()  # nothing made


def test_action_and_origin_go_together(azurite: Azurite, service: BlobServiceClient) -> None:
    storage = f"azure:{azurite.connection_string}"
    code, _, err = _run(storage, "allow")
    assert code == 2
    assert "give ACTION and ORIGIN together" in _one_line_error(err)
    code, _, err = _run(storage, "open", VIEWER)
    assert code == 2
    assert "'open'" in _one_line_error(err)
    assert cors_rules(service) == []


def test_a_sixth_rule_is_refused(azurite: Azurite, service: BlobServiceClient) -> None:
    storage = f"azure:{azurite.connection_string}"
    origins = [f"https://viewer{number}.example" for number in range(MAX_RULES)]
    for origin in origins:
        assert _run(storage, "allow", origin)[0] == 0
    before = cors_rules(service)
    assert len(before) == MAX_RULES

    code, out, err = _run(storage, "allow", VIEWER)
    assert (code, out) == (1, "")
    assert "5 CORS rules, Azure's most: remove one" in _one_line_error(err)
    assert cors_rules(service) == before
    # Allowing one that is there already still works when full: nothing to add.
    assert _run(storage, "allow", origins[0])[:2] == (
        0,
        f"{origins[0]} was already allowed: nothing changed\n",
    )


# What a browser gets from Azurite once the rule is there ------------------------------


@pytest.fixture
def stream_url(azure_storage: AzureStorage) -> Iterator[str]:
    """A stream of three messages on Azurite: its read+list container SAS URL."""
    with Writer.open(azure_storage, "cors-demo") as writer:
        writer.append([("k", b"one"), ("k", b"two")])
        writer.append([("k", b"three")])
    store = azure_storage.open_stream("cors-demo")
    try:
        yield store.read_access().location
    finally:
        store.close()


def _blob_url(container_url: str, blob: str) -> str:
    base, _, sas = container_url.partition("?")
    return f"{base}/{blob}?{sas}"


def _request(url: str, method: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, {k.lower(): v for k, v in answer.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}


def _preflight(url: str, origin: str, method: str = "GET") -> tuple[int, dict[str, str]]:
    return _request(
        url,
        "OPTIONS",
        {
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "range",
        },
    )


def test_a_preflight_is_answered_for_the_allowed_origin_only(
    service: BlobServiceClient, stream_url: str
) -> None:
    data = _blob_url(stream_url, "data")
    status, headers = _preflight(data, VIEWER)
    assert status == 403  # no rule yet: Azurite refuses the preflight
    assert "access-control-allow-origin" not in headers

    allow_origin(service, VIEWER)
    for method in ("GET", "HEAD"):
        status, headers = _preflight(data, VIEWER, method)
        assert status == 200
        assert headers["access-control-allow-origin"] == VIEWER
        assert method in headers["access-control-allow-methods"].split(",")
        assert "range" in headers["access-control-allow-headers"].lower()
        assert headers["access-control-max-age"] == "3600"

    status, headers = _preflight(data, OTHER)
    assert status == 403
    assert "access-control-allow-origin" not in headers
    status, headers = _preflight(data, VIEWER, "PUT")  # reading only
    assert status == 403
    assert "access-control-allow-origin" not in headers


def test_a_cors_read_exposes_the_checkpoint_metadata_and_lengths(
    service: BlobServiceClient, stream_url: str
) -> None:
    allow_origin(service, VIEWER)
    status, headers = _request(_blob_url(stream_url, "checkpoint"), "HEAD", {"Origin": VIEWER})
    assert status == 200
    assert headers["access-control-allow-origin"] == VIEWER
    exposed = {name.strip() for name in headers["access-control-expose-headers"].split(",")}
    metadata = {name for name in headers if name.startswith("x-ms-meta-")}
    assert {"x-ms-meta-commit", "x-ms-meta-length"} <= metadata  # what the JS reader reads
    # Azurite, like Azure, names each header a prefix matched: browsers take no prefixes.
    assert metadata <= exposed
    assert "content-length" in exposed

    status, headers = _request(
        _blob_url(stream_url, "data"), "GET", {"Origin": VIEWER, "Range": "bytes=0-15"}
    )
    assert status == 206
    assert headers["access-control-allow-origin"] == VIEWER
    exposed = {name.strip() for name in headers["access-control-expose-headers"].split(",")}
    assert {"content-range", "content-length", "etag"} <= exposed

    status, headers = _request(_blob_url(stream_url, "checkpoint"), "HEAD", {"Origin": OTHER})
    assert status == 200  # served, as any SAS read is, but nothing lets a browser see it
    assert "access-control-allow-origin" not in headers


def test_any_origin_for_local_development(service: BlobServiceClient, stream_url: str) -> None:
    allow_origin(service, "*")
    status, headers = _preflight(_blob_url(stream_url, "data"), OTHER)
    assert status == 200
    assert headers["access-control-allow-origin"] in ("*", OTHER)


# The JS reader in a real Chromium, on an allowed origin and on another -----------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def _static_site(folder: Path) -> Iterator[str]:
    """``folder`` over HTTP on a free loopback port: a page origin of its own."""
    port = free_port()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


READ_IN_PAGE = """async (location) => {
  const mv = await import("/messagevault.js");
  try {
    const source = new mv.AzureSasSource(location);
    const checkpoint = await source.checkpoint();
    const values = [];
    for await (const message of new mv.StreamReader(source).messages({ checkpoint })) {
      values.push(mv.valueText(message));
    }
    return { values, length: checkpoint.length, indexSize: await source.indexSize() };
  } catch (error) {
    return { error: `${error.name}: ${error.message}` };
  }
}"""


def test_the_js_reader_reads_azure_in_chromium_only_from_an_allowed_origin(
    browser: Browser,
    service: BlobServiceClient,
    azure_storage: AzureStorage,
    stream_url: str,
    tmp_path: Path,
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(ROOT / "clients" / "js" / "messagevault.js", site)
    (site / "index.html").write_text("<!doctype html><title>cors</title>")
    store = azure_storage.open_stream("cors-demo")
    try:
        length = store.read_checkpoint().length
    finally:
        store.close()
    with _static_site(site) as allowed, _static_site(site) as other:
        allow_origin(service, allowed)
        page = browser.new_page()
        try:
            page.goto(f"{allowed}/index.html")
            read = page.evaluate(READ_IN_PAGE, stream_url)
            assert read.get("error") is None, read
            assert read["values"] == ["one", "two", "three"]
            assert read["length"] == length
            assert read["indexSize"] >= 0

            page.goto(f"{other}/index.html")  # same files, an origin no rule names
            refused = page.evaluate(READ_IN_PAGE, stream_url)
            assert refused["error"].startswith("TypeError: Failed to fetch"), refused
        finally:
            page.close()
