"""Secrets that fit a service manager: the first admin's password in a file, storage from a file.

``serve --admin-password-file`` runs as a real process; ``--storage-file``
is tried on a command of each kind in process (``users`` takes
``--storage``, ``publish``/``read`` take ``--url`` or ``--storage``), and
against a real Azurite to show that the account key is echoed nowhere.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import ResourceNotFoundError
from click.testing import CliRunner

from messagevault import FileStorage, Reader
from messagevault.cli import main
from messagevault.server.auth import USERS_FILE, Authenticator, ensure_admin
from messagevault.storage.azure import CONTAINER_PREFIX, SYSTEM_CONTAINER, AzureStorage
from tests.azurite import Azurite, free_port

SECRET_KEY = "c2VjcmV0LWtleS1uZXZlci10by1iZS1zZWVuLWFueXdoZXJl"


def _environment(**variables: str) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MESSAGEVAULT_")}
    return {**inherited, "MESSAGEVAULT_CONFIG": os.environ["MESSAGEVAULT_CONFIG"], **variables}


# -- serve --admin-password-file ------------------------------------------------------


class _Serve:
    """``messagevault serve`` on a free loopback port, up to its ``listening`` line.

    Stopped by PID (SIGTERM, then SIGKILL) by ``close``; ``stderr`` is all it
    wrote there once it has.
    """

    def __init__(self, cwd: Path, *arguments: str, **variables: str) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "messagevault.cli",
                "serve",
                "--port",
                str(self.port),
                *arguments,
            ],
            cwd=cwd,
            env=_environment(MESSAGEVAULT_FSYNC="never", **variables),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            bufsize=0,  # unbuffered: select() must see every line not read yet
        )
        self.stderr = ""
        self.listening: dict[str, Any] | None = None
        assert self.process.stderr is not None
        deadline = time.monotonic() + 30
        for _ in range(10_000):  # debug logs many lines before `listening`
            ready, _, _ = select.select(
                [self.process.stderr], [], [], max(deadline - time.monotonic(), 0)
            )
            line = self.process.stderr.readline().decode() if ready else ""
            if not line:
                break
            self.stderr += line
            if line.startswith("{") and json.loads(line)["message"] == "listening":
                self.listening = json.loads(line)
                break

    def close(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        assert self.process.stderr is not None
        if not self.process.stderr.closed:
            self.stderr += self.process.stderr.read().decode()
            self.process.stderr.close()
        return self.process.returncode

    def __enter__(self) -> _Serve:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _append_as_admin(port: int, password: str) -> int:
    token = base64.b64encode(f"admin:{password}".encode()).decode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/streams/orders",
        data=json.dumps({"messages": [{"value": "placed"}]}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return int(answer.status)


def test_the_first_admin_password_goes_to_a_new_owner_only_file(tmp_path: Path) -> None:
    password_file = tmp_path / "secrets" / "admin-password"
    password_file.parent.mkdir()
    config = tmp_path / "config.toml"
    with _Serve(
        tmp_path,
        "--save-profile",
        "here",
        MESSAGEVAULT_ADMIN_PASSWORD_FILE=str(password_file),
        MESSAGEVAULT_CONFIG=str(config),
    ) as server:
        assert server.listening is not None, server.stderr
        password = password_file.read_text()
        assert len(password) >= 20
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        assert _append_as_admin(server.port, password) == 200
        assert server.close() == 0
    assert password not in server.stderr  # nor in any log line
    assert f"its password is in {password_file} (readable by its owner only)" in server.stderr
    assert f'password = "{password}"' in config.read_text()  # --save-profile still works

    # The next start finds the admin: the file is left as it is, and it says so.
    with _Serve(tmp_path, "--admin-password-file", str(password_file)) as again:
        assert again.listening is not None, again.stderr
        assert again.close() == 0
    assert f"Users exist already: {password_file} not written." in again.stderr
    assert password_file.read_text() == password


def test_nodes_starting_at_once_make_one_admin_whose_password_is_the_one_shown(
    tmp_path: Path,
) -> None:
    """Without an exclusive create, each racer would show a password and the last save win."""
    barrier = threading.Barrier(6)

    def start(_: int) -> str | None:
        storage = FileStorage(tmp_path / "data")  # a node of its own, on the same folder
        barrier.wait(timeout=30)
        return ensure_admin(storage)

    with ThreadPoolExecutor(6) as pool:
        shown = [password for password in pool.map(start, range(6)) if password is not None]
    assert len(shown) == 1
    authenticator = Authenticator(FileStorage(tmp_path / "data"))
    token = base64.b64encode(f"admin:{shown[0]}".encode()).decode()
    assert authenticator.authenticate(f"Basic {token}").name == "admin"


def _no_users(tmp_path: Path) -> bool:
    return FileStorage(tmp_path / "data").read_system_file(USERS_FILE) is None


def test_an_existing_password_file_stops_the_first_start_with_nothing_created(
    tmp_path: Path,
) -> None:
    password_file = tmp_path / "admin-password"
    password_file.write_text("someone else's\n")
    with _Serve(tmp_path, "--admin-password-file", str(password_file)) as server:
        code = server.process.wait(timeout=30)
    assert code == 1
    assert server.listening is None
    errors = [line for line in server.stderr.splitlines() if not line.startswith("{")]
    assert errors == [
        f"error: --admin-password-file {password_file} exists already; nothing was created "
        "(remove it, or choose another path)"
    ]
    assert password_file.read_text() == "someone else's\n"
    assert _no_users(tmp_path)


@pytest.mark.parametrize("where", ["missing-folder/admin-password", "a-file/admin-password"])
def test_a_password_file_that_cannot_be_created_stops_the_start(tmp_path: Path, where: str) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    password_file = tmp_path / where
    with _Serve(tmp_path, "--admin-password-file", str(password_file)) as server:
        code = server.process.wait(timeout=30)
    assert code == 1
    errors = [line for line in server.stderr.splitlines() if not line.startswith("{")]
    assert len(errors) == 1
    assert errors[0].startswith(f"error: cannot create --admin-password-file {password_file}: ")
    assert errors[0].endswith("; nothing was created")
    assert not password_file.exists()
    assert _no_users(tmp_path)


def test_a_folder_as_password_file_is_a_usage_error(tmp_path: Path) -> None:
    with _Serve(tmp_path, "--admin-password-file", str(tmp_path)) as server:
        code = server.process.wait(timeout=30)
    assert code == 2
    assert "Invalid value for '--admin-password-file'" in server.stderr
    assert not (tmp_path / "data").exists()


# -- --storage-file --------------------------------------------------------------------


def _run(
    tmp_path: Path, *args: str, stdin: str | None = None, **env: str | None
) -> tuple[int, str, str]:
    variables: dict[str, str | None] = {
        "MESSAGEVAULT_CONFIG": str(tmp_path / "no-config.toml"),
        **dict.fromkeys(
            [
                "MESSAGEVAULT_STORAGE",
                "MESSAGEVAULT_STORAGE_FILE",
                "MESSAGEVAULT_URL",
                "MESSAGEVAULT_PROFILE",
                "MESSAGEVAULT_USER",
                "MESSAGEVAULT_PASSWORD",
            ]
        ),
        **env,
    }
    result = CliRunner().invoke(
        main, list(args), input=stdin, env=variables, prog_name="messagevault"
    )
    return result.exit_code, result.stdout, result.stderr


def _values(folder: Path, stream: str) -> list[bytes]:
    with Reader.open(FileStorage(folder), stream) as reader:
        return [message.value for message in reader.read()]


def test_storage_comes_from_a_file_on_every_kind_of_command(tmp_path: Path) -> None:
    folder = tmp_path / "vault"
    storage_file = tmp_path / "storage"
    storage_file.write_text(f"\n  file:{folder}  \n")  # surrounding whitespace is no part of it
    code, _, err = _run(tmp_path, "publish", "orders", "one", "--storage-file", str(storage_file))
    assert (code, err) == (0, "")
    code, out, _ = _run(
        tmp_path, "read", "orders", "--format", "value", MESSAGEVAULT_STORAGE_FILE=str(storage_file)
    )
    assert (code, out) == (0, "one\n")
    code, _, err = _run(
        tmp_path,
        "users",
        "add",
        "alice",
        "--storage-file",
        str(storage_file),
        "--claim",
        "admin",
        stdin="secret\n",
    )
    assert code == 0, err
    code, out, _ = _run(tmp_path, "users", "list", MESSAGEVAULT_STORAGE_FILE=str(storage_file))
    assert (code, out) == (0, "alice\tadmin\n")
    assert _values(folder, "orders") == [b"one"]


def test_the_command_line_beats_the_environment_between_storage_and_storage_file(
    tmp_path: Path,
) -> None:
    storage_file = tmp_path / "storage"
    storage_file.write_text(f"file:{tmp_path / 'from-file'}")
    elsewhere = f"file:{tmp_path / 'from-option'}"
    code, _, _ = _run(
        tmp_path,
        "publish",
        "orders",
        "a",
        "--storage-file",
        str(storage_file),
        MESSAGEVAULT_STORAGE=elsewhere,
    )
    assert code == 0
    code, _, _ = _run(
        tmp_path,
        "publish",
        "orders",
        "b",
        "--storage",
        elsewhere,
        MESSAGEVAULT_STORAGE_FILE=str(storage_file),
    )
    assert code == 0
    code, _, _ = _run(  # a file given on the command line beats a server's URL in the environment
        tmp_path,
        "publish",
        "orders",
        "c",
        "--storage-file",
        str(storage_file),
        MESSAGEVAULT_URL="http://127.0.0.1:9",
    )
    assert code == 0
    assert _values(tmp_path / "from-file", "orders") == [b"a", b"c"]
    assert _values(tmp_path / "from-option", "orders") == [b"b"]


@pytest.mark.parametrize("command", [("users", "list"), ("streams",)])
@pytest.mark.parametrize(
    ("arguments", "env", "says"),
    [
        (
            ("--storage", "file:x", "--storage-file", "{storage}"),
            {},
            "--storage and --storage-file are both on the command line",
        ),
        (
            (),
            {"MESSAGEVAULT_STORAGE": "file:x", "MESSAGEVAULT_STORAGE_FILE": "{storage}"},
            "--storage and --storage-file are both set",
        ),
        (("--storage-file", "{tmp}/missing"), {}, "cannot read {tmp}/missing: No such file"),
        (("--storage-file", "{tmp}"), {}, "cannot read {tmp}: Is a directory"),
        (("--storage-file", "{empty}"), {}, "{empty} is empty: it should hold a storage URL"),
        (("--storage-file", "{latin1}"), {}, "{latin1} is not UTF-8 text"),
    ],
)
def test_bad_storage_files_are_one_line_usage_errors_and_open_nothing(
    tmp_path: Path,
    command: tuple[str, ...],
    arguments: tuple[str, ...],
    env: dict[str, str],
    says: str,
) -> None:
    names = {
        "tmp": tmp_path,
        "storage": tmp_path / "storage",
        "empty": tmp_path / "empty",
        "latin1": tmp_path / "latin1",
    }
    names["storage"].write_text(f"file:{tmp_path / 'vault'}\n")
    names["empty"].write_text(" \n\t\n")
    names["latin1"].write_bytes(b"file:caf\xe9")
    given = [argument.format(**names) for argument in arguments]
    variables = {name: value.format(**names) for name, value in env.items()}
    code, _, err = _run(tmp_path, *command, *given, **variables)
    assert code == 2
    assert err.startswith("error: ")
    assert err.count("\n") == 1, err
    assert says.format(**names) in err
    assert not (tmp_path / "vault").exists()
    assert not (tmp_path / "x").exists()


def _connection_string(port: int, key: str = SECRET_KEY) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName=acct;AccountKey={key};"
        f"BlobEndpoint=http://127.0.0.1:{port}/acct;"
    )


def test_an_account_key_on_the_command_line_is_warned_about_and_never_echoed(
    tmp_path: Path,
) -> None:
    closed = free_port()  # nothing listens there: every command fails, and says why
    storage_file = tmp_path / "storage"
    storage_file.write_text(f"azure:{_connection_string(closed)}\n")
    bare_file = tmp_path / "bare"  # the azure: prefix forgotten: it must not become a path
    bare_file.write_text(_connection_string(closed))
    warning = (
        "warning: --storage shows the account key to anyone who runs `ps` (and keeps it in "
        "shell history); use --storage-file PATH or MESSAGEVAULT_STORAGE instead\n"
    )
    runs = {
        "--storage": _run(tmp_path, "streams", "--storage", f"azure:{_connection_string(closed)}"),
        "users --storage": _run(
            tmp_path, "users", "list", "--storage", f"azure:{_connection_string(closed)}"
        ),
        "--storage-file": _run(tmp_path, "streams", "--storage-file", str(storage_file)),
        "env": _run(
            tmp_path, "users", "list", MESSAGEVAULT_STORAGE=f"azure:{_connection_string(closed)}"
        ),
        "bare file": _run(tmp_path, "users", "list", "--storage-file", str(bare_file)),
        "bare --storage": _run(tmp_path, "streams", "--storage", _connection_string(closed)),
    }
    for name, (code, out, err) in runs.items():
        assert SECRET_KEY not in out + err, name
        assert code != 0, name
        assert err.startswith(warning) == ("--storage" in name.split()), name
    for name in ("bare file", "bare --storage"):
        code, _, err = runs[name]
        assert code == 2
        assert "an Azure connection string goes after azure:" in err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bare", "storage"]


def test_serve_reads_azure_storage_from_a_file_and_logs_no_key(
    tmp_path: Path, azurite: Azurite
) -> None:
    key = azurite.connection_string.split("AccountKey=")[1].split(";")[0]
    storage_file = tmp_path / "storage"
    storage_file.write_text(f"azure:{azurite.connection_string}\n")
    storage_file.chmod(0o600)
    try:
        with _Serve(
            tmp_path,
            "--storage-file",
            str(storage_file),
            "--admin-password-file",
            str(tmp_path / "admin-password"),
            "--log-level",
            "debug",  # the Azure SDK's own request lines too
        ) as server:
            assert server.listening is not None, server.stderr
            assert server.listening["storage"].startswith("azure storage account")
            assert _append_as_admin(server.port, (tmp_path / "admin-password").read_text()) == 200
            assert server.close() == 0
        with _Serve(tmp_path, "--storage", f"azure:{azurite.connection_string}") as warned:
            assert warned.listening is not None, warned.stderr
            assert warned.close() == 0
    finally:  # the users the server created: other tests expect an empty account
        service = AzureStorage.from_connection_string(azurite.connection_string).service
        with contextlib.suppress(ResourceNotFoundError):
            service.delete_container(SYSTEM_CONTAINER)
        for container in service.list_containers(name_starts_with=CONTAINER_PREFIX):
            service.delete_container(container.name)
    assert key not in server.stderr
    assert "warning: --storage" not in server.stderr
    assert key not in warned.stderr
    assert warned.stderr.startswith("warning: --storage shows the account key")
