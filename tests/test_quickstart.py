"""The README as a new user meets it: serve, publish, tail, then the Python examples.

``serve --save-profile default`` (what ``make serve`` runs) saves the new
admin as the default profile, which the CLI and the client library then use
with no further set-up. Everything runs for real: a ``messagevault serve``
subprocess and the ``messagevault`` executable, stopped by PID.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from messagevault import FileStorage, StreamLocked, Writer
from messagevault.client.base import Settings
from messagevault.errors import InvalidInput
from messagevault.profiles import save_profile
from tests.azurite import free_port

ROOT = Path(__file__).resolve().parent.parent
EXECUTABLE = shutil.which("messagevault", path=str(Path(sys.executable).parent)) or "messagevault"


def readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


class Served:
    """``messagevault serve --save-profile default`` in ``folder``; killed by PID on exit."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [EXECUTABLE, "serve", "--port", str(self.port), "--save-profile", "default"],
            cwd=folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        # What serve prints, read by a thread: select() cannot see lines that
        # a readline() already pulled into the file object's buffer.
        self.announcements: list[str] = []
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 30
        try:
            while not any('"listening"' in line for line in self.announcements):
                assert self.process.poll() is None, f"serve exited early: {self.announcements}"
                assert time.monotonic() < deadline, f"serve did not come up: {self.announcements}"
                time.sleep(0.02)
        except BaseException:
            self.stop()  # never leave a server behind, whatever failed
            raise

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.announcements.append(line)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._reader.join(timeout=30)
        assert self.process.stderr is not None
        self.process.stderr.close()


@pytest.fixture
def app_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder to work in, and a config file of this test's own."""
    monkeypatch.setenv("MESSAGEVAULT_CONFIG", str(tmp_path / "home" / "config.toml"))
    folder = tmp_path / "app"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture
def served(app_folder: Path) -> Iterator[Served]:
    server = Served(app_folder)
    try:
        yield server
    finally:
        server.stop()


def _cli(folder: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EXECUTABLE, *arguments], cwd=folder, capture_output=True, text=True, timeout=60
    )


def test_serve_publish_tail_in_three_commands(served: Served, app_folder: Path) -> None:
    password = served.announcements[0].rsplit(": ", 1)[-1].strip()
    config = Path(os.environ["MESSAGEVAULT_CONFIG"])
    assert f"Saved as profile 'default' in {config}" in "".join(served.announcements)
    assert stat.S_IMODE(config.stat().st_mode) == 0o600  # it holds a password
    assert tomllib.loads(config.read_text())["profiles"]["default"] == {
        "url": f"http://127.0.0.1:{served.port}",
        "user": "admin",
        "password": password,
    }

    # ./data is the server's folder: the command must go through the server.
    published = _cli(app_folder, "publish", "orders", '{"id": 1}', "--key", "OrderPlaced")
    assert published.returncode == 0, published.stderr
    with subprocess.Popen(
        [EXECUTABLE, "tail", "orders", "-n", "10"],
        cwd=app_folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as tail:
        try:
            assert tail.stdout is not None
            ready, _, _ = select.select([tail.stdout], [], [], 60)
            assert ready, "tail printed nothing"
            record = json.loads(tail.stdout.readline())
            tail.send_signal(signal.SIGINT)  # Ctrl-C
            assert tail.wait(timeout=30) in (0, 130)
        finally:
            if tail.poll() is None:
                tail.kill()
    assert (record["key"], record["value"], record["sequence"]) == ("OrderPlaced", '{"id": 1}', 0)


def test_the_readme_python_examples_run_beside_make_serve(
    served: Served, app_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client_example, embedded_example = readme_python_blocks()
    exec(compile(client_example, "README client example", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("0 0 ")  # position, sequence, id of the first receipt
    assert printed[1] == "2"  # the producer's message
    assert printed[2:] == [  # v2 frames (96-byte headers): publish sends a producer id
        "0 b'OrderPlaced' b'{\"id\": 3}' 100",
        "1 b'OrderPaid' b'{\"id\": 3}' 152",
        "2 b'OrderPlaced' b'{\"id\": 4}' 277",
    ]
    # The embedded example uses storage of its own, so it runs beside the server too.
    exec(compile(embedded_example, "README embedded example", "exec"), {})
    assert capsys.readouterr().out.splitlines() == [
        "0 b'OrderPlaced' b'{\"id\": 1}'",
        "1 b'OrderPaid' b'{\"id\": 1}'",
    ]


def test_a_writer_beside_a_server_is_pointed_to_it(served: Served, app_folder: Path) -> None:
    assert _cli(app_folder, "publish", "orders", "x").returncode == 0  # the server writes it
    with pytest.raises(StreamLocked, match=r"written by the messagevault server .* serves this"):
        Writer.open(FileStorage(app_folder / "data"), "orders")
    # Another folder's stream locked by a plain writer still says just that.
    storage = FileStorage(app_folder / "other")
    with Writer.open(storage, "orders"), pytest.raises(StreamLocked, match="another writer"):
        Writer.open(storage, "orders")


def test_a_restart_leaves_the_saved_profile_alone(app_folder: Path) -> None:
    Served(app_folder).stop()
    config = Path(os.environ["MESSAGEVAULT_CONFIG"])
    saved = config.read_text()
    second = Served(app_folder)  # no new admin: nothing printed, nothing saved
    try:
        assert not any("Created user" in line for line in second.announcements)
    finally:
        second.stop()
    assert config.read_text() == saved


def test_an_existing_profile_and_the_rest_of_the_file_are_kept(app_folder: Path) -> None:
    config = Path(os.environ["MESSAGEVAULT_CONFIG"])
    config.parent.mkdir(parents=True)
    mine = '# my settings\n[profiles.default]\nurl = "http://prod:8080"\n'
    config.write_text(mine)
    config.chmod(0o600)
    assert save_profile("default", "http://127.0.0.1:1", "admin", "pw") is None
    assert config.read_text() == mine
    assert save_profile("local", "http://127.0.0.1:1", "admin", 'p"w\\') == config
    assert config.read_text().startswith(mine)
    profiles = tomllib.loads(config.read_text())["profiles"]
    assert profiles["local"] == {"url": "http://127.0.0.1:1", "user": "admin", "password": 'p"w\\'}
    assert profiles["default"] == {"url": "http://prod:8080"}


def test_the_client_sends_the_profile_password_only_to_its_server(
    app_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_profile("default", "http://127.0.0.1:9999", "admin", "secret")
    mine = Settings.resolve(None, None, None, 30, 0)
    assert [(node.host, node.port) for node in mine.nodes] == [("127.0.0.1", 9999)]
    assert mine.authorization is not None
    monkeypatch.setenv("MESSAGEVAULT_URL", "http://127.0.0.1:9999/")
    assert Settings.resolve(None, None, None, 30, 0).authorization == mine.authorization
    elsewhere = Settings.resolve("http://127.0.0.1:8000", None, None, 30, 0)
    assert elsewhere.authorization is None
    monkeypatch.setenv("MESSAGEVAULT_USER", "app")  # the environment's user wins
    monkeypatch.setenv("MESSAGEVAULT_PASSWORD", "pw")
    assert Settings.resolve(None, None, None, 30, 0).authorization != mine.authorization


def test_a_broken_config_file_is_a_clear_error(app_folder: Path) -> None:
    config = Path(os.environ["MESSAGEVAULT_CONFIG"])
    config.parent.mkdir(parents=True)
    config.write_text("[profiles.default\n")
    from messagevault.client import Client

    with pytest.raises(InvalidInput, match="not valid TOML"):
        Client()
    config.write_text("[profiles.default]\nurl = 5\n")
    with pytest.raises(InvalidInput, match="must hold only string"):
        Client()
    # A server named outright does not depend on the file.
    assert Client("http://127.0.0.1:1").url == "http://127.0.0.1:1"


def test_no_password_is_added_to_a_config_file_others_can_read(app_folder: Path) -> None:
    config = Path(os.environ["MESSAGEVAULT_CONFIG"])
    config.parent.mkdir(parents=True)
    config.write_text("# shared settings\n")
    config.chmod(0o644)
    with pytest.raises(InvalidInput, match="can be read by other users"):
        save_profile("default", "http://127.0.0.1:1", "admin", "pw")
    assert config.read_text() == "# shared settings\n"
    server = Served(app_folder)  # serve warns and runs on
    server.stop()
    assert any("not saved" in line for line in server.announcements)
    assert config.read_text() == "# shared settings\n"
