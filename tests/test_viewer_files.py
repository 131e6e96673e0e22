"""The viewer's files as served: public, a fixed set, safe headers; and the one-file copy.

The page's behaviour in a browser is tests/test_viewer_browser.py; here are
the routes (no credentials needed, nothing else reachable through them), the
standalone file (self-contained, its CSP hashes matching what it holds, valid
JavaScript), and that file opened from disk reading Azurite with no server.
"""

from __future__ import annotations

import base64
import hashlib
import html.parser
import json
import re
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from messagevault import FileStorage, Writer
from messagevault.server import StreamHub, create_app
from messagevault.server.auth import Authenticator, Users, save_users
from messagevault.server.viewer import FILES, STANDALONE, standalone_page, viewer_files
from messagevault.storage.azure import AzureStorage
from tests.azurite import Azurite

if TYPE_CHECKING:
    from playwright.sync_api import Browser

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]
ROOT = Path(__file__).parent.parent
VIEWER = ROOT / "src" / "messagevault" / "viewer"
ADMIN = {"Authorization": "Basic " + base64.b64encode(b"root:root-secret").decode()}


@pytest.fixture
async def client(aiohttp_client: MakeClient, tmp_path: Path) -> Client:
    storage = FileStorage(tmp_path)
    users = Users()
    users.set_password("root", "root-secret")
    users.grant("root", ["admin"])
    save_users(storage, users)
    app = create_app(StreamHub(storage), authenticator=Authenticator(storage, reload_interval=0))
    return await aiohttp_client(app)


CONTENT_TYPES = {
    "index.html": "text/html",
    "viewer.js": "text/javascript",
    "messagevault.js": "text/javascript",
    "viewer.css": "text/css",
    "icon.svg": "image/svg+xml",
}


async def test_every_viewer_file_is_served_without_credentials_with_safe_headers(
    client: Client,
) -> None:
    assert set(FILES) == set(CONTENT_TYPES)
    for name, content_type in CONTENT_TYPES.items():
        response = await client.get(f"/ui/{name}")
        assert response.status == 200, name
        assert response.content_type == content_type, name
        assert await response.read() == (VIEWER / name).read_bytes(), name
        policy = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "'unsafe-inline'" not in policy
        assert "frame-ancestors 'none'" in policy
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
    index = await client.get("/ui/")
    assert await index.read() == (VIEWER / "index.html").read_bytes()


async def test_the_served_reader_is_the_javascript_client_itself(client: Client) -> None:
    """One reader, not a copy that drifts: the package's file is clients/js's."""
    response = await client.get("/ui/messagevault.js")
    assert await response.read() == (ROOT / "clients" / "js" / "messagevault.js").read_bytes()


async def test_the_root_and_ui_without_slash_lead_to_the_viewer(client: Client) -> None:
    for path in ("/", "/ui"):
        response = await client.get(path, allow_redirects=False)
        assert response.status == 302, path
        assert response.headers["Location"] == "/ui/"


@pytest.mark.parametrize(
    "path",
    [
        "/ui/nothing.js",
        "/ui/.env",
        "/ui/users.json",
        "/ui/%2e%2e%2fusers.json",
        "/ui/..%2f..%2fpyproject.toml",
        "/ui/viewer.js/x",
        "/ui/index.html%00",
        "/ui/INDEX.HTML",
    ],
)
async def test_only_the_viewer_files_are_reachable_under_ui(client: Client, path: str) -> None:
    response = await client.get(path, allow_redirects=False)
    assert response.status == 404, path
    body = await response.text()
    assert "argon2" not in body and "[project]" not in body


async def test_the_viewer_being_public_opens_no_stream_route(client: Client) -> None:
    assert (await client.post("/streams/orders", json={"messages": [{"value": "x"}]})).status == 401
    response = await client.get("/streams")
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic")
    assert (await client.get("/streams", headers=ADMIN)).status == 200


async def test_the_stream_list_gives_each_stream_s_last_write(client: Client) -> None:
    for stream in ("orders", "billing"):
        response = await client.post(
            f"/streams/{stream}", json={"messages": [{"value": "x"}]}, headers=ADMIN
        )
        assert response.status == 200
    listed = (await (await client.get("/streams", headers=ADMIN)).json())["streams"]
    assert {s["stream"] for s in listed} == {"orders", "billing"}
    for entry in listed:
        info = await (await client.get(f"/streams/{entry['stream']}", headers=ADMIN)).json()
        assert entry["last_write"] == info["last_write"] is not None
        assert (entry["length"], entry["messages"]) == (info["length"], info["messages"])


class _References(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self.inline_scripts = 0
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.found.append(value)
            if name.startswith("on") or name == "style":
                raise AssertionError(f"<{tag} {name}=...>: the CSP refuses inline handlers/styles")
        self._in_script = tag == "script"

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts += 1

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False


def test_the_page_refers_only_to_files_the_server_serves() -> None:
    parser = _References()
    parser.feed((VIEWER / "index.html").read_text())
    assert parser.inline_scripts == 0
    assert parser.found, "index.html refers to nothing?"
    for reference in parser.found:
        assert reference in FILES or reference == "messagevault-viewer.html", reference
    imported = re.findall(r'from "\./([^"]+)"', (VIEWER / "viewer.js").read_text())
    assert imported == ["messagevault.js"]


def _inline(page: str, tag: str) -> str:
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)
    assert len(found) == 1, f"{len(found)} <{tag}> blocks"
    return found[0]


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


async def test_the_standalone_viewer_is_one_self_contained_file(client: Client) -> None:
    response = await client.get(f"/ui/{STANDALONE}")
    assert response.status == 200
    assert response.headers["Content-Disposition"] == f'attachment; filename="{STANDALONE}"'
    page = await response.text()
    assert page.encode() == standalone_page(viewer_files())
    parser = _References()
    parser.feed(page)
    # The one link left is the served page's download link, hidden without a server.
    outside = [ref for ref in parser.found if not ref.startswith("data:")]
    assert outside == [STANDALONE], parser.found
    script, style = _inline(page, "script"), _inline(page, "style")
    policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page)
    assert policy is not None
    assert f"script-src '{_sha256(script)}'" in policy.group(1)
    assert f"style-src '{_sha256(style)}'" in policy.group(1)
    assert "import " not in script.split("\n", 3)[1]  # the module's imports are gone
    assert not re.search(r"^export ", script, re.M)


@pytest.mark.skipif(shutil.which("node") is None, reason="node checks the script's syntax")
def test_the_standalone_script_is_valid_javascript(tmp_path: Path) -> None:
    script = tmp_path / "viewer.js"
    script.write_text(_inline(standalone_page(viewer_files()).decode(), "script"))
    check = subprocess.run(
        ["node", "--check", str(script)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stderr


def test_the_standalone_file_opened_from_disk_reads_a_stream_from_azurite(
    browser: Browser, azurite: Azurite, azure_storage: AzureStorage, tmp_path: Path
) -> None:
    """No server at all: the file, a SAS URL, and storage that lets any page read with it."""
    writer = Writer.open(azure_storage, "letters")
    try:
        for batch in range(3):
            writer.append(
                [(f"k{i % 5}", json.dumps({"n": batch * 40 + i}).encode()) for i in range(40)]
            )
        sas = writer.read_access().location
    finally:
        writer.close()
    page_file = tmp_path / STANDALONE
    page_file.write_bytes(standalone_page(viewer_files()))
    azurite.allow_origin("*")  # a page opened from disk has the origin "null"
    page = browser.new_page(viewport={"width": 1300, "height": 700})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        page.goto(f"file://{page_file}#sas={sas}")
        page.wait_for_selector(".rows .row[data-sequence='119']", timeout=15_000)
        assert "straight from Azure storage" in page.inner_text("#stream-route")
        assert page.inner_text("#stream-title") == "letters"
        page.click(".rows .row[data-sequence='119']")
        assert json.loads(page.inner_text("#detail-value")) == {"n": 119}
        page.screenshot(path=str(tmp_path / "viewer-standalone.png"))
        assert errors == []
    finally:
        page.close()
