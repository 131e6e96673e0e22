"""The browser viewer's static files, served at ``/ui/`` (docs/VIEWER.md).

The page is static: it logs in with the server's Basic auth and reads
streams itself, with the JavaScript reader (clients/js/messagevault.js),
straight from Azure storage by the SAS URL a stream's info hands out, or
through the binary read route on file storage. So the files are public,
like ``/openapi.json``: they hold no data, and every request the page then
makes is authorised as any other client's.

The files are a fixed set read once when the app is made: no path from a
request ever reaches the file system.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from aiohttp import web

UI_PREFIX = "/ui/"

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

# The page runs only its own scripts and styles; it may fetch this server and
# storage (Azure blob endpoints, Azurite on a loopback port), whose address it
# learns from a stream's read access, hence any http(s) origin for connect-src.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' https: http:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

FILES = ("index.html", "viewer.js", "viewer.css", "messagevault.js", "icon.svg")
STANDALONE = "messagevault-viewer.html"  # the whole viewer in one file, to open from disk


def viewer_files() -> dict[str, tuple[bytes, str]]:
    """The viewer's files by name: their bytes and content type."""
    folder = resources.files("messagevault") / "viewer"
    found = {}
    for name in FILES:
        suffix = name[name.rindex(".") :]
        found[name] = ((folder / name).read_bytes(), _CONTENT_TYPES[suffix])
    return found


def standalone_page(files: dict[str, tuple[bytes, str]]) -> bytes:
    """The viewer as one HTML file with its script, style and icon inside.

    Opened from disk (file://) a page may not load module scripts beside it,
    so the reader and the viewer become one inline script: the reader's
    exports become the locals of a function whose result the viewer's import
    line becomes. A CSP in the page allows exactly that script and style (by
    hash); it reads Azure with a pasted SAS URL as the served page does.
    """
    html = files["index.html"][0].decode()
    reader = files["messagevault.js"][0].decode()
    viewer = files["viewer.js"][0].decode()
    css = files["viewer.css"][0].decode()
    icon = "data:image/svg+xml;base64," + base64.b64encode(files["icon.svg"][0]).decode()
    imported = re.search(r'^import \{([^}]*)\} from "\./messagevault\.js";\n', viewer, re.M)
    if imported is None:
        raise RuntimeError(
            "viewer.js no longer imports ./messagevault.js as the standalone page expects"
        )
    names = ", ".join(name.strip() for name in imported.group(1).split(",") if name.strip())
    body = re.sub(r"^export ", "", reader, flags=re.M)
    script = (
        f'"use strict";\nconst {{ {names} }} = (() => {{\n{body}\nreturn {{ {names} }};\n}})();\n'
        + viewer[: imported.start()]
        + viewer[imported.end() :]
    )
    policy = (
        f"default-src 'none'; script-src '{_sha256(script)}'; style-src '{_sha256(css)}'; "
        "img-src data:; connect-src https: http:; base-uri 'none'; form-action 'none'"
    )
    replacements = {
        '<link rel="stylesheet" href="viewer.css">': f"<style>{css}</style>",
        # An inline classic script runs where it stands (a module would wait for the
        # document): at the end of the body, as the served page's module effectively does.
        '<script type="module" src="viewer.js"></script>': "",
        "</body>": f"<script>{script}</script>\n</body>",
        '<meta name="referrer" content="no-referrer">': (
            '<meta name="referrer" content="no-referrer">\n'
            f'  <meta http-equiv="Content-Security-Policy" content="{policy}">'
        ),
        'href="icon.svg"': f'href="{icon}"',
        'src="icon.svg"': f'src="{icon}"',
    }
    for old, new in replacements.items():
        if old not in html:
            raise RuntimeError(
                f"index.html no longer has {old!r}, which the standalone page replaces"
            )
        html = html.replace(old, new)
    return html.encode()


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


def add_viewer_routes(app: web.Application) -> None:
    files = viewer_files()
    standalone = standalone_page(files)

    async def download(request: web.Request) -> web.Response:
        return web.Response(
            body=standalone,
            headers={
                "Content-Type": "text/html; charset=utf-8",
                "Content-Disposition": f'attachment; filename="{STANDALONE}"',
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-cache",
            },
        )

    async def page(request: web.Request) -> web.Response:
        name = request.match_info.get("name") or "index.html"
        if name not in files:
            raise web.HTTPNotFound(text=f"the viewer has no file {name!r}")
        body, content_type = files[name]
        response = web.Response(body=body, headers={"Content-Type": content_type})
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        # A SAS URL may sit in the page's address (#sas=...): never send it on.
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-cache"
        return response

    async def to_viewer(request: web.Request) -> web.Response:
        # Returned, not raised: the error middleware turns raised HTTP errors into
        # JSON error answers, which would drop the Location.
        return web.Response(status=302, headers={"Location": UI_PREFIX})

    app.router.add_get("/", to_viewer)
    app.router.add_get("/ui", to_viewer)
    app.router.add_get(UI_PREFIX, page)
    app.router.add_get(UI_PREFIX + STANDALONE, download)
    app.router.add_get(UI_PREFIX + "{name}", page)


def is_viewer_path(path: str) -> bool:
    """Paths anyone may fetch: the viewer's files and the redirects to them."""
    return path in ("/", "/ui") or path.startswith(UI_PREFIX)
