"""Transport security: serving TLS directly, and refusing passwords sent in the clear.

``serve --tls-cert/--tls-key`` serves https with ``server_context``. Without
TLS, Basic credentials cross the network readable by anyone on the path, so
a server reachable beyond this machine over plain HTTP is refused at start
(``plain_http_refusal``) and a request bringing a password over plain HTTP
from another machine is refused per request (``InsecureTransport``), unless
``--allow-plain-http`` says a TLS-terminating proxy sits in front.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from pathlib import Path

from aiohttp import web

from messagevault.errors import InsecureTransport

# Set by ``serve --allow-plain-http``: Basic credentials may come over plain
# HTTP from any peer (a TLS-terminating proxy in front). Absent means no.
PLAIN_HTTP_ALLOWED = web.AppKey("plain_http_allowed", bool)

WAYS_OUT = (
    "serve https with --tls-cert CERT --tls-key KEY, or, behind a TLS-terminating "
    "proxy, pass --allow-plain-http"
)


class TLSSetupError(ValueError):
    """The certificate or key cannot be used: unreadable, not PEM, or not a pair."""


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for the PEM certificate chain ``cert`` and its private key ``key``.

    TLS 1.2 at least; the chain may hold intermediates after the server's own
    certificate. Raises ``TLSSetupError`` naming the file at fault.
    """
    for option, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise TLSSetupError(f"{option} {path}: {exc.strerror or exc}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        # OpenSSL's reasons are terse ("KEY_VALUES_MISMATCH", "PEM lib"):
        # say which case it is in words.
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            reason = f"the key {key} does not belong to the certificate {cert}"
        else:
            reason = f"{cert} and {key} must be a PEM certificate chain and its private key"
        raise TLSSetupError(f"{reason} ({exc.reason or exc})") from None
    context.set_alpn_protocols(["http/1.1"])
    return context


def is_loopback(address: str | None) -> bool:
    """Whether ``address`` (an IP address as ``request.remote`` gives it) is this machine's.

    127.0.0.0/8, ::1 and IPv4-mapped 127.x (``::ffff:127.0.0.1``, as a
    dual-stack socket reports IPv4 peers). Anything else, unknown included,
    is another machine.
    """
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def is_loopback_host(host: str) -> bool:
    """Whether serving on ``host`` (``--host``) is reachable from this machine only.

    The any-addresses (``0.0.0.0``, ``::``, empty) are not; a name counts as
    loopback only when every address it resolves to is (``localhost``).
    """
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - recognising, not binding, the any-address
        return False
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    else:
        return is_loopback(host)
    try:
        found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False  # the bind fails on it anyway; no reason to think it local
    return bool(found) and all(is_loopback(str(entry[4][0])) for entry in found)


def plain_http_refusal(host: str, *, tls: bool, allow_plain_http: bool) -> str | None:
    """Why ``serve`` must not start as asked (one line), or None when it may."""
    if tls or allow_plain_http or is_loopback_host(host):
        return None
    return (
        f"--host {host} serves beyond this machine over plain HTTP, where passwords "
        f"travel readable: {WAYS_OUT}"
    )


def refuse_plain_basic(request: web.Request, authorization: str | None) -> None:
    """Raise ``InsecureTransport`` for Basic credentials over plain HTTP from another machine.

    Checked before the credentials are: a password that crossed the network
    in the clear must not also work, or the client would never notice.
    """
    if authorization is None or authorization[:6].lower() != "basic ":
        return
    if request.secure or request.app.get(PLAIN_HTTP_ALLOWED, False):
        return
    if is_loopback(request.remote):
        return
    raise InsecureTransport(
        "Basic credentials over plain HTTP from another machine are refused: use https "
        "(serve --tls-cert/--tls-key), or a TLS-terminating proxy and serve --allow-plain-http"
    )
