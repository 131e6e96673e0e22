"""The messagevault command, in process, on real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from messagevault import FileStorage, Writer
from messagevault.cli import main


def _run(tmp_path: Path, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    runner = CliRunner()
    result = runner.invoke(
        main, [*args], input=stdin, env={"MESSAGEVAULT_STORAGE": f"file:{tmp_path}"}
    )
    return result.exit_code, result.stdout, result.stderr


def test_publish_read_info_verify(tmp_path: Path) -> None:
    code, out, _ = _run(tmp_path, "publish", "orders", "one", "two", "--key", "Placed")
    assert code == 0
    assert json.loads(out) == {"stream": "orders", "position": 100, "first_sequence": 0, "count": 2}
    code, out, _ = _run(tmp_path, "publish", "orders", "--stdin", stdin="three\nfour\n")
    assert code == 0
    code, out, _ = _run(tmp_path, "read", "orders")
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["value"] for r in records] == ["one", "two", "three", "four"]
    assert [r["key"] for r in records[:2]] == ["Placed", "Placed"]
    code, out, _ = _run(
        tmp_path, "read", "orders", "--from", str(records[2]["position"]), "--limit", "1"
    )
    assert [json.loads(line)["value"] for line in out.splitlines()] == ["three"]
    code, out, _ = _run(tmp_path, "info", "orders")
    info = json.loads(out)
    assert info["messages"] == 4
    assert info["length"] == records[-1]["next_position"]
    code, out, _ = _run(tmp_path, "verify", "orders")
    assert code == 0
    assert "OK, 4 messages in 2 frames" in out
    code, out, _ = _run(tmp_path, "streams")
    assert "orders" in out


def test_binary_values_come_out_as_base64(tmp_path: Path) -> None:
    with Writer.open(FileStorage(tmp_path), "blobs") as writer:
        writer.append([(b"k", b"\xff\x00")])
    _, out, _ = _run(tmp_path, "read", "blobs")
    record = json.loads(out)
    assert (record["value"], record["encoding"]) == ("/wA=", "base64")


def test_errors_are_one_line_and_exit_1(tmp_path: Path) -> None:
    code, _, err = _run(tmp_path, "read", "Bad_Name")
    assert code == 1
    assert err.startswith("error: stream name 'Bad_Name'")
    code, _, err = _run(tmp_path, "read", "missing")
    assert code == 1
    assert "does not exist" in err
    _run(tmp_path, "publish", "orders", "x")
    code, _, err = _run(tmp_path, "read", "orders", "--from", "3")
    assert code == 1
    assert "not the position of a message" in err
    code, _, err = _run(tmp_path, "publish", "orders")
    assert code == 2
    assert "nothing to publish" in err


def test_verify_reports_damage(tmp_path: Path) -> None:
    _run(tmp_path, "publish", "orders", "hello", "world")
    data = tmp_path / "orders" / "data"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    code, _, err = _run(tmp_path, "verify", "orders")
    assert code == 1
    assert "CRC mismatch at position 0" in err


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
    ],
)
def test_serve_rejects_bad_limits_before_starting(tmp_path: Path, option: tuple[str, str]) -> None:
    code, _, err = _run(tmp_path, "serve", *option)
    assert code == 2
    assert option[0] in err
    assert not (tmp_path / "_system").exists()  # nothing was set up
