"""TLS served directly, and Basic credentials refused over plain HTTP beyond this machine.

Certificates are made here with ``cryptography``: a private CA and a server
certificate for 127.0.0.1 it signed. Every socket is on 127.0.0.1; another
machine's address appears only as a request's (cloned) remote address.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import select
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from messagevault.client import AsyncClient, Client
from messagevault.errors import InsecureTransport, ServerUnreachable
from messagevault.server import StreamHub, create_app
from messagevault.server.app import AUTH, PRINCIPAL, authentication
from messagevault.server.auth import Authenticator, Unauthenticated, Users, save_users
from messagevault.server.tls import (
    PLAIN_HTTP_ALLOWED,
    TLSSetupError,
    is_loopback,
    is_loopback_host,
    plain_http_refusal,
    refuse_plain_basic,
    server_context,
)
from messagevault.storage import FileStorage
from tests.served import ServedApp

PASSWORD = "tls-test-password"
ELSEWHERE = "192.0.2.7"  # TEST-NET-1: an address of another machine, never contacted


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path
    other_key: Path  # a key that belongs to no certificate here


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A private CA and a server certificate it signed for 127.0.0.1 and localhost."""
    folder = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "messagevault test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = _key()
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "other")
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(_pem_key(server_key))
    pki.other_key.write_bytes(_pem_key(_key()))
    return pki


# -- the server's context ------------------------------------------------------------


def test_the_server_context_speaks_tls_1_2_at_least(pki: Pki) -> None:
    context = server_context(pki.cert, pki.key)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


@pytest.mark.parametrize(
    ("files", "says"),
    [
        (("missing-cert", "key"), "--tls-cert {tmp}/missing-cert: No such file or directory"),
        (("cert", "missing-key"), "--tls-key {tmp}/missing-key: No such file or directory"),
        (("cert", "other_key"), "the key {other_key} does not belong to the certificate {cert}"),
        (("garbage", "key"), "{tmp}/garbage and {key} must be a PEM certificate chain"),
        (("key", "cert"), "must be a PEM certificate chain and its private key"),
    ],
)
def test_unusable_certificates_or_keys_are_named(
    pki: Pki, tmp_path: Path, files: tuple[str, str], says: str
) -> None:
    (tmp_path / "garbage").write_text("not a certificate\n")
    paths = {
        "cert": pki.cert,
        "key": pki.key,
        "other_key": pki.other_key,
        "missing-cert": tmp_path / "missing-cert",
        "missing-key": tmp_path / "missing-key",
        "garbage": tmp_path / "garbage",
    }
    with pytest.raises(TLSSetupError) as raised:
        server_context(paths[files[0]], paths[files[1]])
    assert says.format(tmp=tmp_path, **paths) in str(raised.value)


# -- loopback, and the refusal at start ------------------------------------------------


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),  # an IPv4 peer on a dual-stack socket
        ("10.0.0.5", False),
        ("192.168.1.20", False),
        ("::ffff:10.0.0.5", False),
        ("fe80::1", False),
        ("0.0.0.0", False),
        ("localhost", False),  # a peer is an address, never a name
        ("", False),
        (None, False),
    ],
)
def test_is_loopback(address: str | None, loopback: bool) -> None:
    assert is_loopback(address) is loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("192.168.1.20", False),
        ("no-such-host.invalid", False),
    ],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_plain_http_beyond_this_machine_is_refused_unless_tls_or_opted_in() -> None:
    refusal = plain_http_refusal("0.0.0.0", tls=False, allow_plain_http=False)
    assert refusal is not None
    assert "--tls-cert" in refusal
    assert "--allow-plain-http" in refusal
    assert "\n" not in refusal
    assert plain_http_refusal("0.0.0.0", tls=True, allow_plain_http=False) is None
    assert plain_http_refusal("0.0.0.0", tls=False, allow_plain_http=True) is None
    assert plain_http_refusal("127.0.0.1", tls=False, allow_plain_http=False) is None


def _serve_exits(cwd: Path, *arguments: str) -> tuple[int, str]:
    """``messagevault serve`` expected to exit at once: (exit code, stderr); killed after 60 s."""
    done = subprocess.run(
        [sys.executable, "-m", "messagevault.cli", "serve", "--port", "0", *arguments],
        cwd=cwd,
        env=_environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stderr.decode()


def _environment(**variables: str) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MESSAGEVAULT_")}
    return {**inherited, "MESSAGEVAULT_CONFIG": os.environ["MESSAGEVAULT_CONFIG"], **variables}


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7"])
def test_serve_refuses_plain_http_on_a_non_loopback_host(tmp_path: Path, host: str) -> None:
    code, stderr = _serve_exits(tmp_path, "--host", host)
    assert code == 2
    assert stderr.count("\n") == 1, stderr
    assert f"--host {host} serves beyond this machine over plain HTTP" in stderr
    assert "--tls-cert CERT --tls-key KEY" in stderr
    assert "--allow-plain-http" in stderr
    assert not (tmp_path / "data").exists()  # nothing opened, nothing created


@pytest.mark.parametrize(
    ("arguments", "code", "says"),
    [
        (("--tls-cert", "{cert}"), 2, "give --tls-cert and --tls-key together, or neither"),
        (("--tls-key", "{key}"), 2, "give --tls-cert and --tls-key together, or neither"),
        (
            ("--tls-cert", "{cert}", "--tls-key", "{other_key}"),
            1,
            "error: cannot serve https: the key {other_key} does not belong to the certificate",
        ),
        (
            ("--tls-cert", "{cert}", "--tls-key", "{tmp}/nothing"),
            1,
            "error: cannot serve https: --tls-key {tmp}/nothing: No such file or directory",
        ),
    ],
)
def test_serve_with_unusable_tls_options_exits_having_created_nothing(
    pki: Pki, tmp_path: Path, arguments: tuple[str, ...], code: int, says: str
) -> None:
    names = {"cert": pki.cert, "key": pki.key, "other_key": pki.other_key, "tmp": tmp_path}
    given = [argument.format(**names) for argument in arguments]
    exit_code, stderr = _serve_exits(tmp_path, *given)
    assert exit_code == code
    assert stderr.count("\n") == 1, stderr
    assert says.format(**names) in stderr
    assert not (tmp_path / "data").exists()


# -- https served: a real round trip ----------------------------------------------------


class _Serve:
    """``messagevault serve`` on a free loopback port; stopped by PID on exit."""

    def __init__(self, cwd: Path, *arguments: str, **variables: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "messagevault.cli", "serve", "--port", "0", *arguments],
            cwd=cwd,
            env=_environment(**variables),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            bufsize=0,  # unbuffered: select() must see every line not read yet
        )
        self.before: list[str] = []  # stderr lines before `listening`
        self.listening = self._wait_for_listening()

    def _wait_for_listening(self) -> dict[str, Any]:
        assert self.process.stderr is not None
        deadline = time.monotonic() + 30
        for _ in range(100):
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.process.stderr], [], [], max(remaining, 0))
            if not ready:
                break
            line = self.process.stderr.readline().decode()
            if not line:
                break
            if line.startswith("{") and json.loads(line)["message"] == "listening":
                return json.loads(line)  # type: ignore[no-any-return]
            self.before.append(line)
        self.close()
        raise AssertionError(f"serve did not start: {''.join(self.before)}")

    def close(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        assert self.process.stderr is not None
        self.process.stderr.close()
        return self.process.returncode

    def __enter__(self) -> _Serve:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@pytest.fixture
def https_server(pki: Pki, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A server on https://127.0.0.1:PORT with its new admin's password in a file.

    Its --save-profile goes to this test's config file, ``tmp_path/config.toml``.
    """
    password_file = tmp_path / "admin-password"
    with _Serve(
        tmp_path,
        "--tls-cert",
        str(pki.cert),
        "--tls-key",
        str(pki.key),
        "--admin-password-file",
        str(password_file),
        "--save-profile",
        "tls",
        MESSAGEVAULT_FSYNC="never",
        MESSAGEVAULT_CONFIG=str(tmp_path / "config.toml"),
    ) as server:
        url = server.listening["url"]
        assert url == f"https://127.0.0.1:{server.listening['port']}"
        yield url, password_file.read_text()


def test_clients_reach_an_https_server_trusting_a_private_ca_by_ssl_cert_file(
    pki: Pki, https_server: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, password = https_server
    # Not trusted by default: the certificate is checked, not taken as it comes.
    with (
        Client(url, user="admin", password=password, retries=0) as client,
        pytest.raises(ServerUnreachable, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        client.publish("orders", [b"refused"])
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    with Client(url, user="admin", password=password) as client:
        client.publish("orders", [b"one", b"two"])
        assert [m.value for m in client.read("orders")] == [b"one", b"two"]


async def test_the_async_client_reaches_an_https_server_trusting_a_private_ca(
    pki: Pki, https_server: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, password = https_server
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    async with AsyncClient(url, user="admin", password=password) as client:
        await client.publish("orders", [b"async"])
        assert [m.value async for m in client.read("orders")] == [b"async"]


def test_the_cli_reaches_an_https_server_and_the_saved_profile_says_https(
    pki: Pki, https_server: tuple[str, str], tmp_path: Path
) -> None:
    url, _ = https_server
    config = tmp_path / "config.toml"
    assert f'url = "{url}"' in config.read_text()  # --save-profile tls, written by this start
    done = subprocess.run(
        [sys.executable, "-m", "messagevault.cli", "publish", "--profile", "tls", "sss", "hello"],
        env=_environment(SSL_CERT_FILE=str(pki.ca), MESSAGEVAULT_CONFIG=str(config)),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["stream"] == "sss"


def test_plain_http_to_the_https_port_gets_no_answer(https_server: tuple[str, str]) -> None:
    url, _ = https_server
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(url.replace("https:", "http:") + "/health", timeout=10)


# -- Basic credentials over plain HTTP from another machine -------------------------------


def _basic(password: str = PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()


def _app_with_admin(tmp_path: Path) -> web.Application:
    storage = FileStorage(tmp_path / "data")
    users = Users()
    users.set_password("admin", PASSWORD)
    users.grant("admin", ["admin"])
    save_users(storage, users)
    return create_app(StreamHub(storage), authenticator=Authenticator(storage))


async def _reached(request: web.Request) -> web.StreamResponse:
    return web.Response(text=request[PRINCIPAL].name)


def _request(
    app: web.Application, remote: str, authorization: str | None, *, scheme: str = "http"
) -> web.Request:
    headers = {"Authorization": authorization} if authorization else {}
    return make_mocked_request("GET", "/streams", headers=headers, app=app).clone(
        remote=remote, scheme=scheme
    )


async def test_basic_credentials_from_another_machine_over_plain_http_are_refused_unchecked(
    tmp_path: Path,
) -> None:
    app = _app_with_admin(tmp_path)
    # A wrong password is refused as insecure, not as wrong: it was never checked.
    for password in (PASSWORD, "wrong"):
        with pytest.raises(InsecureTransport) as raised:
            await authentication(_request(app, ELSEWHERE, _basic(password)), _reached)
        assert raised.value.code == "insecure_transport"
    with pytest.raises(InsecureTransport):
        await authentication(_request(app, "::ffff:192.0.2.7", _basic()), _reached)
    with pytest.raises(InsecureTransport):  # the scheme's name is no excuse either
        await authentication(_request(app, ELSEWHERE, "bAsIc " + _basic()[6:]), _reached)


@pytest.mark.parametrize(
    ("remote", "scheme", "allowed"),
    [
        ("127.0.0.1", "http", False),  # this machine: a reverse proxy here, or a local client
        ("::1", "http", False),
        (ELSEWHERE, "https", False),  # encrypted
        (ELSEWHERE, "http", True),  # --allow-plain-http: TLS ended at a proxy in front
    ],
)
async def test_basic_credentials_pass_on_loopback_over_tls_or_when_allowed(
    tmp_path: Path, remote: str, scheme: str, allowed: bool
) -> None:
    app = _app_with_admin(tmp_path)
    app[PLAIN_HTTP_ALLOWED] = allowed
    answer = await authentication(_request(app, remote, _basic(), scheme=scheme), _reached)
    assert isinstance(answer, web.Response)
    assert answer.text == "admin"
    with pytest.raises(Unauthenticated):  # and they are checked
        await authentication(_request(app, remote, _basic("wrong"), scheme=scheme), _reached)


async def test_requests_without_basic_credentials_are_not_refused_as_insecure(
    tmp_path: Path,
) -> None:
    app = _app_with_admin(tmp_path)
    with pytest.raises(Unauthenticated):  # no credentials: the usual 401
        await authentication(_request(app, ELSEWHERE, None), _reached)
    request = make_mocked_request("GET", "/health", app=app).clone(remote=ELSEWHERE)
    refuse_plain_basic(request, None)
    assert AUTH in app


def test_the_refusal_is_a_403_json_error_through_the_whole_app(tmp_path: Path) -> None:
    app = _app_with_admin(tmp_path)

    @web.middleware
    async def from_elsewhere(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        return await handler(request.clone(remote=ELSEWHERE))

    app.middlewares.insert(0, from_elsewhere)
    with ServedApp(app) as served:
        request = urllib.request.Request(
            f"{served.url}/streams", headers={"Authorization": _basic()}
        )
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(request, timeout=30)
        answer = raised.value
        body = json.loads(answer.read())
        answer.close()
    assert answer.code == 403
    assert body["error"] == "insecure_transport"
    assert "--allow-plain-http" in body["detail"]
    assert "WWW-Authenticate" not in answer.headers
