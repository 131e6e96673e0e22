"""The messagevault command, in process, on real files (the server side: test_cli_server.py)."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from messagevault import FileStorage, Reader, Writer
from messagevault.cli import main
from messagevault.cli_config import Target
from messagevault.cli_sources import StorageSource
from messagevault.format import MAX_VALUE_SIZE, Message
from messagevault.server import Limits, StreamHub, create_app
from messagevault.wire import message_record, record_json
from tests.azurite import free_port
from tests.served import ServedApp


def _run(
    tmp_path: Path, *args: str, stdin: str | bytes | None = None, **env: str | None
) -> tuple[int, str, str]:
    runner = CliRunner()
    variables: dict[str, str | None] = {
        "MESSAGEVAULT_STORAGE": f"file:{tmp_path}",
        "MESSAGEVAULT_CONFIG": str(tmp_path / "no-config.toml"),
        **dict.fromkeys(
            [
                "MESSAGEVAULT_URL",
                "MESSAGEVAULT_PROFILE",
                "MESSAGEVAULT_USER",
                "MESSAGEVAULT_PASSWORD",
            ]
        ),
        **env,
    }
    result = runner.invoke(main, [*args], input=stdin, env=variables, prog_name="messagevault")
    return result.exit_code, result.stdout, result.stderr


def _stored(tmp_path: Path, stream: str) -> list[tuple[bytes, bytes]]:
    with Reader.open(FileStorage(tmp_path), stream) as reader:
        return [(m.key, m.value) for m in reader.read()]


def _one_line_error(err: str) -> str:
    assert err.startswith("error: ")
    assert err.count("\n") == 1, err
    return err


def test_publish_read_info_verify(tmp_path: Path) -> None:
    code, out, _ = _run(tmp_path, "publish", "orders", "one", "two", "--key", "Placed")
    assert code == 0
    assert json.loads(out) == {
        "stream": "orders",
        "count": 2,
        "batches": 1,
        "first_sequence": 0,
        "first_position": 0,
        "position": 100,
    }
    code, out, _ = _run(tmp_path, "publish", "orders", "--stdin", stdin="three\nfour\r\n")
    assert code == 0
    code, out, _ = _run(tmp_path, "read", "orders")
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["value"] for r in records] == ["one", "two", "three", "four"]
    assert [r["key"] for r in records[:2]] == ["Placed", "Placed"]
    code, out, _ = _run(
        tmp_path, "read", "orders", "--from", str(records[2]["position"]), "--limit", "1"
    )
    assert [json.loads(line)["value"] for line in out.splitlines()] == ["three"]
    code, out, _ = _run(tmp_path, "read", "orders", "--sequence", "3", "--format", "value")
    assert out == "four\n"
    code, out, _ = _run(tmp_path, "read", "orders", "--end")
    assert (code, out) == (0, "")
    code, out, _ = _run(tmp_path, "info", "orders")
    info = json.loads(out)
    assert info["messages"] == 4
    assert info["length"] == records[-1]["next_position"]
    code, out, _ = _run(tmp_path, "verify", "orders")
    assert code == 0
    assert "OK, 4 messages in 2 frames" in out
    code, out, _ = _run(tmp_path, "streams")
    assert json.loads(out) == {"stream": "orders", "messages": 4, "length": info["length"]}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (b"k", b"plain"),
        (b'Order"Placed"', 'caf\u00e9 \u2603 \U0001f600 \\ "q" \n\t\x00\x1f'.encode()),
        (b"", b""),
        (b"\xff\xfe", b"text"),  # a binary key
        (b"k", b"\xff\x00"),  # a binary value
    ],
)
def test_ndjson_lines_are_the_http_records(key: bytes, value: bytes) -> None:
    """A line holds what wire.message_record does, field for field, in its order."""
    message = Message(1260, 3000, 1_764_000_000_123, key, value, 1340)
    line = record_json(message)
    assert b"\n" not in line
    assert list(json.loads(line).items()) == list(message_record(message).items())


def test_arguments_that_are_not_utf8_are_stored_as_given(tmp_path: Path) -> None:
    # The shell passes bytes; Python's argv decodes them with surrogateescape.
    raw_value, raw_key = b"caf\xe9", b"\xff"
    value, key = (
        raw_value.decode("utf-8", "surrogateescape"),
        raw_key.decode("utf-8", "surrogateescape"),
    )
    code, _, err = _run(tmp_path, "publish", "orders", value, "--key", key)
    assert (code, err) == (0, "")
    assert _stored(tmp_path, "orders") == [(raw_key, raw_value)]
    _, out, _ = _run(tmp_path, "read", "orders")
    record = json.loads(out)
    assert (record["key_encoding"], record["encoding"]) == ("base64", "base64")
    assert base64.b64decode(record["value"]) == raw_value


def test_stdin_beyond_one_batch_goes_in_several(tmp_path: Path) -> None:
    lines = [f"line {n}" for n in range(25_001)]
    code, out, err = _run(tmp_path, "publish", "numbers", "--stdin", stdin="\n".join(lines))
    assert (code, err) == (0, "")
    summary = json.loads(out)
    assert (summary["count"], summary["batches"]) == (25_001, 3)
    assert [value.decode() for _, value in _stored(tmp_path, "numbers")] == lines
    code, out, _ = _run(
        tmp_path, "publish", "sized", "--batch-bytes", "1024", *[f"{n:0100}" for n in range(20)]
    )
    assert json.loads(out)["batches"] == 3  # 109 bytes a message, 64 a frame header: 8 a batch


def test_ndjson_round_trip_keeps_every_byte(tmp_path: Path) -> None:
    messages = [(b"\xff\x00", b"binary \xfe"), (b"text", "caf\u00e9".encode()), (b"", b"")]
    with Writer.open(FileStorage(tmp_path), "source") as writer:
        writer.append(messages)
    _, out, _ = _run(tmp_path, "read", "source")
    code, _, err = _run(tmp_path, "publish", "target", "--ndjson", "-", stdin=out)
    assert (code, err) == (0, "")
    assert _stored(tmp_path, "target") == messages


def test_files_are_one_message_each(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"\x00\x01\xff")
    (tmp_path / "b.txt").write_bytes(b"two\nlines\n")
    code, _, _ = _run(
        tmp_path,
        "publish",
        "files",
        "--file",
        str(tmp_path / "a.bin"),
        "--file",
        str(tmp_path / "b.txt"),
    )
    assert code == 0
    assert _stored(tmp_path, "files") == [(b"", b"\x00\x01\xff"), (b"", b"two\nlines\n")]


@pytest.mark.parametrize(
    ("args", "stdin", "code", "expected"),
    [
        (("read", "Bad_Name"), None, 1, "error: stream name 'Bad_Name'"),
        (("publish", "Bad_Name", "x"), None, 1, "error: stream name 'Bad_Name'"),
        (("read", "missing"), None, 1, "`messagevault streams` lists the streams"),
        (("read", "orders", "--from", "3"), None, 1, "not the position of a message"),
        (("read", "orders", "--from", "-1"), None, 2, "'--from'"),
        (("read", "orders", "--sequence", "7"), None, 1, "there is no sequence 7"),
        (("read", "orders", "--from", "0", "--end"), None, 2, "choose one place to start"),
        (("read", "orders", "--url", "http://127.0.0.1:1", "--storage", "x"), None, 2, "not both"),
        (("publish", "orders"), None, 2, "nothing to publish"),
        (("publish", "orders", "--file", "/no/such/file"), None, 2, "does not exist"),
        (("publish", "orders", "--file", "/"), None, 2, "is a directory"),
        (("publish", "orders", "--ndjson", "/no/such/file"), None, 2, "'--ndjson'"),
        (
            ("publish", "orders", "--ndjson", "-"),
            '{"value": "fine"}\n\n{"value": "oops"\n',
            1,
            "line 3 of stdin is not JSON",
        ),
        (
            ("publish", "orders", "--ndjson", "-"),
            '{"value": "fine"}\n{"value": "%%%", "encoding": "base64"}\n',
            1,
            "line 2 of stdin: value is not valid base64",
        ),
        (("publish", "orders", "--ndjson", "-"), "[1]\n", 1, "line 1 of stdin: the record must"),
        (("publish", "orders", "--stdin", "--ndjson", "-"), "x\n", 2, "choose one"),
        (("publish", "orders", "--key", "k" * 256, "x"), None, 1, "VALUES argument 1: the key"),
        (("streams", "--storage", "file:/no/such/folder"), None, 1, "no folder /no/such/folder"),
        (("streams", "--storage", "ftp:x"), None, 2, "unknown storage 'ftp'"),
        (("verify",), None, 2, "give STREAM, or --sas URL"),
        (("copy", "orders", "--from", "file:x", "--to", "http://h"), None, 2, "DST must be"),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(
    tmp_path: Path, args: tuple[str, ...], stdin: str | None, code: int, expected: str
) -> None:
    _run(tmp_path, "publish", "orders", "x")
    before = (tmp_path / "orders" / "data").read_bytes()
    got, _, err = _run(tmp_path, *args, stdin=stdin)
    assert got == code
    assert expected in _one_line_error(err)
    assert "Traceback" not in err
    assert (tmp_path / "orders" / "data").read_bytes() == before
    assert FileStorage(tmp_path).list_streams() == ["orders"]


def test_a_value_over_the_frame_limit_is_published_whole_and_read_back(tmp_path: Path) -> None:
    big = "0123456789abcdef" * (MAX_VALUE_SIZE // 8) + "x"  # 8 MiB + 1: three pieces
    code, _, err = _run(tmp_path, "publish", "orders", "--stdin", stdin=f"small\n{big}\nlast\n")
    assert code == 0, err
    assert _stored(tmp_path, "orders") == [(b"", b"small"), (b"", big.encode()), (b"", b"last")]
    code, out, _ = _run(tmp_path, "read", "orders", "--format", "value")
    assert (code, out) == (0, f"small\n{big}\nlast\n")
    code, out, _ = _run(tmp_path, "read", "orders", "--format", "ndjson")
    assert [json.loads(line)["value"] for line in out.splitlines()] == ["small", big, "last"]
    code, out, _ = _run(tmp_path, "read", "orders", "--sequence", "1", "--format", "ndjson")
    assert [json.loads(line)["value"] for line in out.splitlines()] == [big, "last"]
    code, out, _ = _run(tmp_path, "read", "orders", "--format", "table", COLUMNS="100")
    assert code == 0 and out.count("0123456789abcdef") < 10  # a column's worth, not 8 MiB
    code, out, _ = _run(tmp_path, "verify", "orders")
    assert code == 0 and "OK, 3 messages in 5 frames" in out  # small, head, 2 pieces, last


def test_streams_tells_a_typo_from_an_empty_data_folder(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(tmp_path, "streams", "--storage", f"file:{empty}")[:2] == (0, "")
    (tmp_path / "notes.txt").write_text("not a stream")
    (tmp_path / "photos").mkdir()
    code, _, err = _run(tmp_path, "streams")
    assert code == 1
    assert f"{tmp_path} (MESSAGEVAULT_STORAGE) is not a MessageVault data folder" in err
    _run(tmp_path, "publish", "orders", "x")  # a data folder may hold other things too
    code, out, _ = _run(tmp_path, "streams")
    assert (code, json.loads(out)["stream"]) == (0, "orders")


def test_publishing_beside_a_server_points_to_it(tmp_path: Path) -> None:
    """A server holds its streams' writer locks; the CLI must say to go through it."""
    with Writer.open(FileStorage(tmp_path), "orders"):  # as a running server would
        code, _, err = _run(tmp_path, "publish", "orders", "hello")
    assert code == 1
    assert "already open for writing by another writer" in _one_line_error(err)
    assert "a server probably holds it" in err
    assert "messagevault publish --url http://127.0.0.1:8080" in err


def test_both_environment_sources_are_refused_but_a_flag_decides(tmp_path: Path) -> None:
    code, _, err = _run(tmp_path, "streams", MESSAGEVAULT_URL="http://127.0.0.1:1")
    assert code == 2
    assert "MESSAGEVAULT_URL and MESSAGEVAULT_STORAGE are both set" in _one_line_error(err)
    _run(tmp_path, "publish", "orders", "x")
    code, out, _ = _run(
        tmp_path, "streams", "--storage", f"file:{tmp_path}", MESSAGEVAULT_URL="http://127.0.0.1:1"
    )
    assert (code, json.loads(out)["stream"]) == (0, "orders")


def test_copy_between_storages_is_incremental_and_refuses_a_stranger(tmp_path: Path) -> None:
    source, copy = tmp_path / "source", tmp_path / "copy"
    _run(source, "publish", "orders", "one", "two")
    args = ("copy", "orders", "--from", f"file:{source}", "--to", f"file:{copy}")
    code, out, err = _run(tmp_path, *args)
    assert (code, err) == (0, "")
    assert json.loads(out)["copied"] == 2
    _run(source, "publish", "orders", "--stdin", stdin="three\nfour\nfive\n")
    code, out, _ = _run(tmp_path, *args)
    assert (json.loads(out)["copied"], json.loads(out)["messages"]) == (3, 5)
    assert (copy / "orders" / "data").read_bytes() == (source / "orders" / "data").read_bytes()
    assert _run(copy, "verify", "orders")[0] == 0
    _run(tmp_path / "other", "publish", "orders", "one", "TWO")
    code, _, err = _run(tmp_path, *args[:-1], f"file:{tmp_path / 'other'}")
    assert code == 1
    assert "not a copy of this source" in _one_line_error(err)
    code, _, err = _run(
        tmp_path, "copy", "orders", "--from", f"file:{copy}", "--to", f"file:{copy}"
    )
    assert code == 2
    assert "the same stream" in _one_line_error(err)


def test_verify_reports_damage(tmp_path: Path) -> None:
    _run(tmp_path, "publish", "orders", "hello", "world")
    data = tmp_path / "orders" / "data"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    code, _, err = _run(tmp_path, "verify", "orders")
    assert code == 1
    assert "CRC mismatch at position 0" in _one_line_error(err)


def _every_command() -> list[str]:
    """Every command and subcommand the CLI has (a new one is checked without listing it)."""
    import click

    from messagevault.cli import main

    found = [""]
    for name, command in main.commands.items():  # type: ignore[attr-defined]
        found.append(name)
        if isinstance(command, click.Group):
            found.extend(f"{name} {sub}" for sub in command.commands)
    return found


@pytest.mark.parametrize("command", _every_command())
def test_every_command_shows_an_example(tmp_path: Path, command: str) -> None:
    code, out, _ = _run(tmp_path, *command.split(), "--help")
    assert code == 0, command or "messagevault"
    examples = out.partition("Examples:\n")[2]
    assert examples.lstrip().startswith(" ".join(["messagevault", *command.split()[:1]]))


def test_serve_rejects_an_unknown_storage(tmp_path: Path) -> None:
    code, _, err = _run(tmp_path, "serve", "--storage", "ftp:somewhere", "--port", "0")
    assert code == 2
    assert "unknown storage" in err


@pytest.mark.parametrize(
    "option",
    [
        ("--linger-ms", "-1"),
        ("--linger-ms", "5000"),
        ("--max-body", "10"),
        ("--max-read-messages", "0"),
        ("--max-queue-wait", "soon"),
        ("--checkpoint-flush-interval", "-1"),
        ("--checkpoint-flush-interval", "nan"),
        ("--checkpoint-flush-interval", "1e9"),
    ],
)
def test_serve_rejects_bad_limits_before_starting(tmp_path: Path, option: tuple[str, str]) -> None:
    code, _, err = _run(tmp_path, "serve", *option)
    assert code == 2
    assert option[0] in err
    assert not (tmp_path / "_system").exists()  # nothing was set up


def test_profiles_and_the_environment_choose_the_server_in_order(tmp_path: Path) -> None:
    """--profile beats MESSAGEVAULT_URL, which beats the default profile (rules: cli_config)."""
    ports = [free_port() for _ in range(3)]  # nobody listens: the error names the URL and rule
    config = tmp_path / "config.toml"
    config.write_text(
        f'[profiles.chosen]\nurl = "http://127.0.0.1:{ports[0]}"\n'
        f'[profiles.default]\nurl = "http://127.0.0.1:{ports[1]}"\n'
    )
    env = {"MESSAGEVAULT_CONFIG": str(config), "MESSAGEVAULT_STORAGE": None}
    url = f"http://127.0.0.1:{ports[2]}"
    cases = [
        (
            ("--profile", "chosen"),
            {"MESSAGEVAULT_URL": url},
            f":{ports[0]} (from profile 'chosen')",
        ),
        ((), {"MESSAGEVAULT_URL": url}, f":{ports[2]} (from MESSAGEVAULT_URL)"),
        ((), {}, f":{ports[1]} (from profile 'default')"),
    ]
    for args, variables, expected in cases:
        code, _, err = _run(tmp_path, "streams", *args, **env, **variables)
        assert code == 1
        assert expected in _one_line_error(err)
        assert "Start one with `messagevault serve`" in err
    _run(tmp_path / "data", "publish", "orders", "x")
    code, out, _ = _run(tmp_path, "streams", "--storage", f"file:{tmp_path / 'data'}", **env)
    assert (code, json.loads(out)["stream"]) == (0, "orders")


@pytest.mark.parametrize(
    ("text", "args", "code", "expected"),
    [
        ('[profiles.a]\nurl = "x"\n', ("--profile", "b"), 2, "no profile 'b' in"),
        ("[profiles.a\n", ("--profile", "a"), 1, "is not valid TOML"),
        ('[profiles.a]\nuri = "x"\n', ("--profile", "a"), 1, "unknown keys uri"),
        ("[profiles.a]\nurl = 1\n", ("--profile", "a"), 1, "url of profile 'a' must be a string"),
    ],
)
def test_bad_config_files_are_one_line(
    tmp_path: Path, text: str, args: tuple[str, ...], code: int, expected: str
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text)
    got, _, err = _run(tmp_path, "streams", *args, MESSAGEVAULT_CONFIG=str(config))
    assert got == code
    assert expected in _one_line_error(err)


def test_following_storage_misses_nothing_committed_while_it_starts(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    with Writer.open(storage, "orders") as writer:
        writer.append([(b"", b"first")])
        source = StorageSource(storage, Target(storage=f"file:{tmp_path}"))
        stop = threading.Event()
        runs = source.follow("orders", 0, stop)
        writer.append([(b"", b"second")])  # after the follow began, before its first run is read
        deadline = threading.Timer(10, stop.set)  # a follow that missed it ends, and fails
        deadline.start()
        seen: list[bytes] = []
        for run in runs:
            seen += [m.value for m in run]
            if len(seen) >= 2:
                break
        deadline.cancel()
        stop.set()
        source.close()
    assert seen == [b"first", b"second"]


class _Listener:
    """A loopback HTTP listener that answers 401 and records the Authorization headers."""

    def __init__(self) -> None:
        import http.server
        import threading

        seen: list[str | None] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append(self.headers.get("Authorization"))
                body = b'{"error": "unauthenticated", "detail": "no"}'
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.seen = seen
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def test_the_default_profiles_password_goes_only_to_its_own_server(tmp_path: Path) -> None:
    listener = _Listener()
    config = tmp_path / "config.toml"
    config.write_text(
        '[profiles.default]\nurl = "http://127.0.0.1:1"\nuser = "admin"\npassword = "TOPSECRET"\n'
    )
    config.chmod(0o600)
    try:
        code, _, err = _run(
            tmp_path, "streams", "--url", listener.url, MESSAGEVAULT_CONFIG=str(config)
        )
    finally:
        listener.close()
    assert code == 1
    assert listener.seen and all(header is None for header in listener.seen)
    assert "TOPSECRET" not in err


def test_a_password_in_the_url_is_never_printed(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    code, _, err = _run(tmp_path, "streams", "--url", f"http://admin:S3CRET@127.0.0.1:{port}")
    assert code == 1
    assert "S3CRET" not in err
    assert f"http://127.0.0.1:{port}" in _one_line_error(err)


def test_storage_commands_do_not_read_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    config.write_text("[profiles.default\n")
    _run(tmp_path, "publish", "orders", "x")
    code, out, err = _run(
        tmp_path, "read", "orders", "--storage", f"file:{tmp_path}", MESSAGEVAULT_CONFIG=str(config)
    )
    assert (code, err) == (0, "")
    assert json.loads(out)["value"] == "x"


def test_publish_of_a_value_over_the_servers_limit_says_what_bounds_it(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "served", fsync="never")
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 5000)
    with ServedApp(create_app(StreamHub(storage), Limits(max_body=4096))) as server:
        code, _, err = _run(tmp_path, "publish", "orders", "--file", str(big), "--url", server.url)
        assert code == 1
        assert "the batch, a single value, is 5,105 bytes, over the server's request limit" in (
            _one_line_error(err)
        )
        assert "one value cannot be split" in err and "--max-body" in err
        code, _, err = _run(
            tmp_path, "publish", "orders", "a" * 3000, "b" * 3000, "--batch-bytes", "8192",
            "--url", server.url,
        )  # fmt: skip
        assert code == 1
        assert "the batch of 2 messages is " in _one_line_error(err)
        assert "a lower --batch-bytes (now 8,192) makes them smaller" in err
    assert storage.list_streams() == []
