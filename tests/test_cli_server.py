"""The real ``messagevault`` executable against a real ``messagevault serve``, on files and Azurite.

Each command is a subprocess (~0.3 s of start-up each), so the cases are few
and each walks through several commands.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from messagevault import FileStorage, Reader
from tests.azurite import Azurite, free_port

MESSAGEVAULT = str(Path(sys.executable).parent / "messagevault")
PASSWORD = "cli-test-password"


def _environment(folder: Path, **variables: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MESSAGEVAULT_")}
    return {**clean, "MESSAGEVAULT_CONFIG": str(folder / "no-config.toml"), **variables}


def _cli(
    folder: Path, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    done = subprocess.run(
        [MESSAGEVAULT, *args],
        cwd=folder,
        env=_environment(folder, **(env or {})),
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def _one_line(err: str) -> str:
    assert err.startswith("error: "), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


class _Serve:
    """``messagevault serve`` on a free port with a user of known password; stopped by PID."""

    def __init__(self, folder: Path, storage: str) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.storage = storage
        code, _, err = _cli(
            folder, "users", "add", "tester", "--claim", "admin", "--storage", storage,
            stdin=PASSWORD.encode(),
        )  # fmt: skip
        assert code == 0, err
        self.log = (folder / "serve.log").open("wb")
        self.process = subprocess.Popen(
            [MESSAGEVAULT, "serve", "--port", str(self.port), "--storage", storage],
            cwd=folder,
            env=_environment(folder),
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )

    def __enter__(self) -> _Serve:
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, (self.folder / "serve.log").read_text()
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1):
                    return self
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.05)

    def __exit__(self, *exc_info: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.log.close()

    @property
    def env(self) -> dict[str, str]:
        """What a user of this server sets: where it is and who they are."""
        return {
            "MESSAGEVAULT_URL": self.url,
            "MESSAGEVAULT_USER": "tester",
            "MESSAGEVAULT_PASSWORD": PASSWORD,
        }


def test_the_cli_through_a_server_on_files(tmp_path: Path) -> None:
    with _Serve(tmp_path, "file:data") as server:
        env = server.env
        code, out, err = _cli(tmp_path, "publish", "orders", "one", "two", "--key", "K", env=env)
        assert (code, err) == (0, "")
        assert json.loads(out)["count"] == 2
        lines = b"".join(b"line %d\n" % n for n in range(12_000))
        code, out, _ = _cli(tmp_path, "publish", "orders", "--stdin", stdin=lines, env=env)
        assert (json.loads(out)["count"], json.loads(out)["batches"]) == (12_000, 2)

        code, out, _ = _cli(
            tmp_path, "read", "orders", "--sequence", "5000", "--limit", "2", env=env
        )
        assert [json.loads(line)["value"] for line in out.splitlines()] == [
            "line 4998",
            "line 4999",
        ]
        for source in (env, {"MESSAGEVAULT_STORAGE": "file:data"}):  # ends at the limit
            code, out, _ = _cli(tmp_path, "read", "orders", "--follow", "--limit", "3", env=source)
            assert [json.loads(line)["value"] for line in out.splitlines()] == [
                "one",
                "two",
                "line 0",
            ]
        code, out, _ = _cli(tmp_path, "streams", env=env)
        assert json.loads(out) == {
            "stream": "orders",
            "messages": 12_002,
            "length": json.loads(out)["length"],
        }
        code, out, _ = _cli(tmp_path, "info", "orders", env=env)
        assert json.loads(out)["read_access"]["kind"] == "file"
        code, out, _ = _cli(tmp_path, "verify", "orders", env=env)
        assert "OK, 12,002 messages" in out

        # Frames of format v2 (a compressed batch, a value in pieces) copy as
        # stored too: the copy reads frames, not messages, from the server.
        big = b"%08d" % 1 * (700 * 1024) + b"\n"  # 5.5 MiB: a value in pieces
        for options in ((), ("--compress",)):
            code, out, err = _cli(
                tmp_path, "publish", "orders", "--stdin", *options, stdin=big + b"s\n", env=env
            )
            assert (code, err, json.loads(out)["count"]) == (0, "", 2)
        code, out, err = _cli(
            tmp_path, "copy", "orders", "--from", server.url, "--to", "file:copy", env=env
        )
        assert (code, err) == (0, "")
        assert json.loads(out)["copied"] == 12_006
        # The serving writer keeps its data file ahead of the stream in zeros.
        with Reader.open(FileStorage(tmp_path / "data"), "orders") as reader:
            length = reader.checkpoint().length
        stored = (tmp_path / "data" / "orders" / "data").read_bytes()[:length]
        code, _, err = _cli(
            tmp_path, "copy", "nope", "--from", server.url, "--to", "file:copy", env=env
        )
        assert (code, "'nope' does not exist" in _one_line(err)) == (1, True)
        assert not (tmp_path / "copy" / "nope").exists()
        assert (tmp_path / "copy" / "orders" / "data").read_bytes() == stored

        # Bad paths: one line each, exit 1.
        code, _, err = _cli(tmp_path, "publish", "orders", "x", "--storage", "file:data")
        assert code == 1
        assert "a server probably holds it" in _one_line(err)
        code, _, err = _cli(tmp_path, "read", "missing", env=env)
        assert (code, "'missing' does not exist" in _one_line(err)) == (1, True)
        code, _, err = _cli(tmp_path, "read", "orders", "--from", "3", env=env)
        assert (code, "not the position of a message" in _one_line(err)) == (1, True)
        code, _, err = _cli(tmp_path, "streams", env={**env, "MESSAGEVAULT_PASSWORD": "wrong"})
        assert code == 1
        assert "MESSAGEVAULT_USER and MESSAGEVAULT_PASSWORD" in _one_line(err)

        # A profile of the config file instead of the environment.
        config = tmp_path / "config.toml"
        config.write_text(
            f'[profiles.test]\nurl = "{server.url}"\nuser = "tester"\npassword = "{PASSWORD}"\n'
        )
        config.chmod(0o644)
        code, out, err = _cli(
            tmp_path, "streams", "--profile", "test", env={"MESSAGEVAULT_CONFIG": str(config)}
        )
        assert (code, json.loads(out)["stream"]) == (0, "orders")
        assert err == (
            f"warning: {config} holds a password and other users can read it; "
            f"run: chmod 600 {config}\n"
        )
    code, _, err = _cli(tmp_path, "streams", env=env)  # the server is gone
    assert code == 1
    assert f"{server.url}" in _one_line(err)
    assert "messagevault serve" in err


def test_tail_prints_as_messages_come_and_ctrl_c_ends_it(tmp_path: Path) -> None:
    with _Serve(tmp_path, "file:data") as server:
        _cli(tmp_path, "publish", "orders", "before", env=server.env)
        with subprocess.Popen(
            [MESSAGEVAULT, "tail", "orders", "--format", "value"],
            cwd=tmp_path,
            env=_environment(tmp_path, **server.env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as tail:
            assert tail.stdout is not None and tail.stderr is not None
            try:
                deadline = time.monotonic() + 30
                os.set_blocking(tail.stdout.fileno(), False)
                seen = b""
                while b"after" not in seen:  # until the tail has found the end and follows
                    assert time.monotonic() < deadline, seen
                    assert tail.poll() is None, tail.stderr.read()
                    _cli(tmp_path, "publish", "orders", "after", env=server.env)
                    time.sleep(0.2)
                    seen += tail.stdout.read() or b""
                tail.send_signal(signal.SIGINT)
                assert tail.wait(timeout=20) == 0
                assert b"Traceback" not in tail.stderr.read()
                assert b"before" not in seen  # from the end: only what came after
            finally:
                if tail.poll() is None:
                    tail.kill()
                    tail.wait(timeout=10)


def test_the_cli_on_azurite_with_sas_urls(tmp_path: Path, azurite: Azurite) -> None:
    storage = f"azure:{azurite.connection_string}"
    with _Serve(tmp_path, storage) as server:
        env = server.env
        code, _, err = _cli(tmp_path, "publish", "azcli", "one", "two", "three", env=env)
        assert (code, err) == (0, "")
        _, out, _ = _cli(tmp_path, "info", "azcli", env=env)
        access = json.loads(out)["read_access"]
        assert access["kind"] == "azure-sas"
        code, out, err = _cli(tmp_path, "verify", "--sas", access["location"])
        assert (code, err) == (0, "")
        assert "azcli: OK, 3 messages in 1 frames" in out
        sas = {"MESSAGEVAULT_SAS_URL": access["location"]}  # the token kept out of argv
        code, out, err = _cli(tmp_path, "verify", env=sas)
        assert (code, err) == (0, "")
        assert "azcli: OK, 3 messages in 1 frames" in out
        args = ("copy", "azcli", "--from", f"sas:{access['location']}", "--to", "file:cache")
        code, out, err = _cli(tmp_path, *args)
        assert (code, err) == (0, "")
        _cli(tmp_path, "publish", "azcli", "four", env=env)
        code, out, _ = _cli(tmp_path, *args)
        assert json.loads(out)["copied"] == 1
    values = [m.value for m in Reader.open(FileStorage(tmp_path / "cache"), "azcli").read()]
    assert values == [b"one", b"two", b"three", b"four"]
