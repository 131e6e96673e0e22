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


def viewer_files() -> dict[str, tuple[bytes, str]]:
    """The viewer's files by name: their bytes and content type."""
    folder = resources.files("messagevault") / "viewer"
    found = {}
    for name in FILES:
        suffix = name[name.rindex(".") :]
        found[name] = ((folder / name).read_bytes(), _CONTENT_TYPES[suffix])
    return found


def add_viewer_routes(app: web.Application) -> None:
    files = viewer_files()

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
        raise web.HTTPFound(UI_PREFIX)

    app.router.add_get("/", to_viewer)
    app.router.add_get("/ui", to_viewer)
    app.router.add_get(UI_PREFIX, page)
    app.router.add_get(UI_PREFIX + "{name}", page)


def is_viewer_path(path: str) -> bool:
    """Paths anyone may fetch: the viewer's files and the redirects to them."""
    return path in ("/", "/ui") or path.startswith(UI_PREFIX)
