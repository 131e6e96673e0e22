"""Retention policies: kept in storage, set by admins, applied by the server in the background."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from messagevault import FileStorage, MemoryStorage, Reader, Writer, cli_output
from messagevault.cli import main
from messagevault.client import AsyncClient
from messagevault.errors import Forbidden, InvalidInput, StreamNotFound
from messagevault.format import encode_batch, read_header
from messagevault.retention_policy import (
    RetentionPolicy,
    delete_policy,
    format_duration,
    format_size,
    load_policy,
    parse_size,
    policy_file,
    save_policy,
)
from messagevault.server import StreamHub, create_app
from messagevault.server.app import RETENTION
from messagevault.server.auth import Authenticator
from messagevault.server.retention_task import (
    RetentionSettings,
    RetentionTask,
    retention_target,
    whole_frame_from,
)
from messagevault.storage.base import Storage
from tests.admin_users import (
    READER,
    ROOT,
    WRITER,
    cheap_passwords,  # noqa: F401 - an autouse fixture
    error_detail,
    publish,
    with_users,
)
from tests.prometheus_text import sample
from tests.served import ServedApp

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


async def _client(
    aiohttp_client: MakeClient,
    storage: MemoryStorage,
    retention: RetentionSettings | None = None,
) -> Client:
    app = create_app(
        StreamHub(storage),
        authenticator=Authenticator(storage, reload_interval=0),
        retention=retention,
    )
    return await aiohttp_client(app)


# The policy and its units ------------------------------------------------------------------


def test_policy_round_trips_through_json() -> None:
    policy = RetentionPolicy(max_age=7 * 86400.0, max_bytes=10 * 1024**3)
    assert RetentionPolicy.from_json(json.loads(json.dumps(policy.to_json()))) == policy
    assert RetentionPolicy.from_json({"max_age": 60}) == RetentionPolicy(max_age=60.0)
    assert RetentionPolicy.from_json({"max_bytes": 1, "max_age": None}).max_bytes == 1
    assert policy.describe() == "max age 7d, max bytes 10GiB"


@pytest.mark.parametrize(
    ("document", "words"),
    [
        ({}, "needs max_age or max_bytes"),
        ({"max_age": None, "max_bytes": None}, "needs max_age or max_bytes"),
        ({"max_age": -1}, "max_age must be"),
        ({"max_age": 0}, "max_age must be"),
        ({"max_age": "7d"}, "max_age must be"),
        ({"max_age": True}, "max_age must be"),
        ({"max_age": 1e300}, "max_age must be"),
        ({"max_bytes": 0}, "max_bytes must be"),
        ({"max_bytes": -5}, "max_bytes must be"),
        ({"max_bytes": 1.5}, "max_bytes must be"),
        ({"max_bytes": "10GiB"}, "max_bytes must be"),
        ({"max_bytes": 2**70}, "max_bytes must be"),
        ({"max_age": 60, "maxage": 5}, "unknown retention field"),
        ([60, 100], "is a JSON object"),
        (None, "is a JSON object"),
    ],
)
def test_bad_policies_are_refused_clearly(document: object, words: str) -> None:
    with pytest.raises(InvalidInput, match=words):
        RetentionPolicy.from_json(document)


def test_sizes_and_durations_as_people_write_them() -> None:
    assert parse_size("10GiB") == 10 * 1024**3
    assert parse_size("500MB") == 500_000_000
    assert parse_size("64 kib") == 65536
    assert parse_size("1.5GiB") == 3 * 1024**3 // 2
    assert parse_size("4096") == 4096
    for bad in ("", "ten GiB", "10 GiBs", "-1MB", "0", "10XB", "1e3"):
        with pytest.raises(InvalidInput, match="size"):
            parse_size(bad)
    assert format_size(10 * 1024**3) == "10GiB"
    assert format_size(1500) == "1500B"
    assert format_duration(90 * 86400) == "90d"
    assert format_duration(5400) == "90m"
    assert format_duration(1.5) == "1.5s"


@pytest.mark.parametrize("backend", ["memory", "file"])
def test_policies_live_in_system_files(backend: str, tmp_path: Path) -> None:
    storage = MemoryStorage() if backend == "memory" else FileStorage(tmp_path)
    assert load_policy(storage, "orders") is None
    save_policy(storage, "orders", RetentionPolicy(max_bytes=1000))
    assert load_policy(storage, "orders") == RetentionPolicy(max_bytes=1000)
    assert load_policy(storage, "billing") is None  # one file per stream
    assert storage.read_system_file(policy_file("orders")) is not None
    assert delete_policy(storage, "orders") is True
    assert load_policy(storage, "orders") is None
    assert delete_policy(storage, "orders") is False  # deleting again is no error
    if isinstance(storage, FileStorage):
        assert not (tmp_path / "_system" / policy_file("orders")).exists()


def test_a_damaged_stored_policy_says_which_file() -> None:
    storage = MemoryStorage()
    storage.write_system_file(policy_file("orders"), b'{"max_age": -3}')
    with pytest.raises(InvalidInput, match=r"retention\.orders\.json.*damaged"):
        load_policy(storage, "orders")


# Over HTTP ---------------------------------------------------------------------------------


async def test_admin_sets_shows_and_clears_a_policy(aiohttp_client: MakeClient) -> None:
    client = await _client(aiohttp_client, with_users(MemoryStorage()))
    await publish(client, "orders", ["a"])
    shown = await (await client.get("/streams/orders/retention", headers=READER)).json()
    assert shown == {"stream": "orders", "max_age": None, "max_bytes": None, "source": "none"}

    response = await client.put(
        "/streams/orders/retention", json={"max_age": 3600, "max_bytes": 1024}, headers=ROOT
    )
    assert response.status == 200, await response.text()
    expected = {"stream": "orders", "max_age": 3600.0, "max_bytes": 1024, "source": "stream"}
    assert await response.json() == expected
    shown = await (await client.get("/streams/orders/retention", headers=READER)).json()
    assert shown == expected

    response = await client.delete("/streams/orders/retention", headers=ROOT)
    assert response.status == 204
    shown = await (await client.get("/streams/orders/retention", headers=READER)).json()
    assert shown["source"] == "none"


async def test_a_stream_without_a_policy_shows_the_default(aiohttp_client: MakeClient) -> None:
    default = RetentionPolicy(max_age=90 * 86400.0)
    client = await _client(
        aiohttp_client, with_users(MemoryStorage()), RetentionSettings(default=default)
    )
    await publish(client, "orders", ["a"])
    shown = await (await client.get("/streams/orders/retention", headers=READER)).json()
    assert shown == {
        "stream": "orders",
        "max_age": 90 * 86400.0,
        "max_bytes": None,
        "source": "default",
    }


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"max_age": -1}', "max_age must be"),
        (b'{"max_bytes": 0}', "max_bytes must be"),
        (b'{"max_bytes": "10GiB"}', "max_bytes must be"),
        (b'{"max_age": null, "max_bytes": null}', "needs max_age or max_bytes"),
        (b'{"keep": "forever"}', "unknown retention field"),
        (b"{max_age: 5}", "not JSON"),
        (b"", "not JSON"),
        (b"[]", "JSON object"),
    ],
)
async def test_bad_policies_over_http_change_nothing(
    aiohttp_client: MakeClient, body: bytes, words: str
) -> None:
    storage = with_users(MemoryStorage())
    client = await _client(aiohttp_client, storage)
    await publish(client, "orders", ["a"])
    save_policy(storage, "orders", RetentionPolicy(max_bytes=5000))
    response = await client.put(
        "/streams/orders/retention",
        data=body,
        headers={**ROOT, "Content-Type": "application/json"},
    )
    assert words in await error_detail(response, 400, "invalid_input")
    assert load_policy(storage, "orders") == RetentionPolicy(max_bytes=5000)


async def test_who_may_do_what_with_policies(aiohttp_client: MakeClient) -> None:
    storage = with_users(MemoryStorage())
    client = await _client(aiohttp_client, storage)
    await publish(client, "orders", ["a"])
    await publish(client, "billing", ["a"])
    for headers in (WRITER, READER):
        response = await client.put(
            "/streams/orders/retention", json={"max_age": 60}, headers=headers
        )
        assert "admin" in await error_detail(response, 403, "forbidden")
        response = await client.delete("/streams/orders/retention", headers=headers)
        await error_detail(response, 403, "forbidden")
    assert load_policy(storage, "orders") is None
    # Reading a policy takes reading the stream.
    await error_detail(
        await client.get("/streams/billing/retention", headers=READER), 403, "forbidden"
    )
    await error_detail(await client.get("/streams/orders/retention"), 401, "unauthenticated")


async def test_policies_of_streams_that_are_not_there(aiohttp_client: MakeClient) -> None:
    storage = with_users(MemoryStorage())
    client = await _client(aiohttp_client, storage)
    policy = {"max_age": 60}
    response = await client.put("/streams/nothing/retention", json=policy, headers=ROOT)
    await error_detail(response, 404, "stream_not_found")
    assert load_policy(storage, "nothing") is None
    await error_detail(
        await client.get("/streams/nothing/retention", headers=ROOT), 404, "stream_not_found"
    )
    response = await client.put("/streams/Bad_Name/retention", json=policy, headers=ROOT)
    await error_detail(response, 400, "invalid_stream_name")
    await publish(client, "orders", ["a"])
    response = await client.put(
        "/streams/orders/retention",
        data=b"max_age=60",
        headers={**ROOT, "Content-Type": "application/x-www-form-urlencoded"},
    )
    await error_detail(response, 415, "unsupported_media_type")


# Applying policies -------------------------------------------------------------------------


def _stream_of_varied_frames(storage: Storage, stream: str) -> list[int]:
    """Frames of 1-40 messages with values of 1 B-3 KiB; the frame starts."""
    starts = []
    with Writer.open(storage, stream) as writer:
        for n in range(60):
            count = 1 + (n * 7) % 40
            size = 1 + (n * 523) % 3000
            result = writer.append_batches(
                [encode_batch([(b"k", bytes([n % 256]) * size)] * count)]
            )[0]
            starts.append(result[0].position)
    return starts


@pytest.mark.parametrize("backend", ["memory", "file"])
def test_the_first_whole_frame_at_or_after_any_position(backend: str, tmp_path: Path) -> None:
    storage: Storage = MemoryStorage() if backend == "memory" else FileStorage(tmp_path)
    starts = _stream_of_varied_frames(storage, "orders")
    with Reader.open(storage, "orders") as reader:
        checkpoint = reader.checkpoint()
        ends = [*starts[1:], checkpoint.length]
        for target in sorted({0, 1, checkpoint.length - 1, *starts, *(s + 1 for s in starts)}):
            expected = next((s for s in starts if s >= target), checkpoint.length)
            assert whole_frame_from(reader, checkpoint, target) == expected, target
        assert ends[-1] == checkpoint.length


def test_the_target_of_each_limit() -> None:
    storage = MemoryStorage()
    starts = _stream_of_varied_frames(storage, "orders")
    with Reader.open(storage, "orders") as reader:
        checkpoint = reader.checkpoint()
    store = storage.open_stream("orders")
    last_timestamp = read_header(store.read(starts[-1], 96), 0, starts[-1]).timestamp
    length = checkpoint.length
    now = last_timestamp / 1000
    # Bytes: at most max_bytes stay, cut at a frame start.
    for max_bytes in (1, 5000, length // 2, length - 1):
        _, target = retention_target(storage, "orders", RetentionPolicy(max_bytes=max_bytes), now)
        assert target == next(s for s in [*starts, length] if s >= length - max_bytes)
        assert length - target <= max_bytes
    _, target = retention_target(storage, "orders", RetentionPolicy(max_bytes=length), now)
    assert target == 0
    # Age: everything older than now - max_age goes.
    _, target = retention_target(storage, "orders", RetentionPolicy(max_age=1e6), now)
    assert target == 0
    _, target = retention_target(storage, "orders", RetentionPolicy(max_age=1), now + 3600)
    assert target == length  # every message is older
    # Both: the later cut wins.
    both = RetentionPolicy(max_age=1e6, max_bytes=5000)
    _, target = retention_target(storage, "orders", both, now)
    assert target == next(s for s in [*starts, length] if s >= length - 5000)


async def test_the_server_trims_by_bytes_in_the_background(aiohttp_client: MakeClient) -> None:
    storage = with_users(MemoryStorage())
    client = await _client(aiohttp_client, storage, RetentionSettings(interval=0.05))
    for n in range(20):
        await publish(client, "orders", [f"message {n} " + "x" * 200])
    await publish(client, "billing", ["kept: no policy"])
    response = await client.put("/streams/orders/retention", json={"max_bytes": 1000}, headers=ROOT)
    assert response.status == 200
    checkpoint = storage.open_stream("orders").read_checkpoint()
    for _ in range(200):  # bounded: 10 s at most
        checkpoint = storage.open_stream("orders").read_checkpoint()
        if checkpoint.first_position:
            break
        await asyncio.sleep(0.05)
    assert 0 < checkpoint.length - checkpoint.first_position <= 1000
    assert storage.open_stream("billing").read_checkpoint().first_position == 0
    # What is left reads from the first readable message; below it is refused.
    with Reader.open(storage, "orders") as reader:
        values = [m.value for m in reader.read(checkpoint.first_position)]
    assert values[-1].startswith(b"message 19 ")
    # Metrics: the bytes trimmed, the first position.
    metrics = await (await client.get("/metrics")).text()
    assert sample(metrics, "messagevault_retention_trimmed_bytes_total", stream="orders") == (
        checkpoint.first_position
    )
    assert sample(metrics, "messagevault_stream_first_position_bytes", stream="orders") == (
        checkpoint.first_position
    )


async def test_the_server_trims_by_age(aiohttp_client: MakeClient) -> None:
    storage = with_users(MemoryStorage())
    client = await _client(aiohttp_client, storage)
    app = client.app
    assert app is not None
    task: RetentionTask = app[RETENTION]
    for n in range(5):
        await publish(client, "orders", [f"old {n}"])
    old = storage.open_stream("orders").read_checkpoint()
    await asyncio.sleep(0.01)  # the next message is stamped a later millisecond
    await publish(client, "orders", ["new"])
    new = storage.open_stream("orders").read_checkpoint()
    assert new.last_timestamp > old.last_timestamp
    await client.put("/streams/orders/retention", json={"max_age": 3600}, headers=ROOT)
    # An hour after the first, to the millisecond: it is not older than the hour yet.
    first = read_header(storage.open_stream("orders").read(0, 96), 0, 0).timestamp
    task.clock = lambda: first / 1000 + 3600
    assert await task.run_once() == []
    # An hour after "new": the old ones go, "new" stays.
    task.clock = lambda: new.last_timestamp / 1000 + 3600
    (applied,) = await task.run_once()
    assert applied.stream == "orders"
    assert (applied.first_position, applied.first_sequence) == (old.length, 5)
    assert applied.trimmed_bytes == old.length
    assert storage.open_stream("orders").read_checkpoint().first_position == old.length
    assert await task.run_once() == []  # nothing more to do
    # Later still: every message is older, and all of them go.
    task.clock = lambda: new.last_timestamp / 1000 + 3601
    (applied,) = await task.run_once()
    assert (applied.first_position, applied.first_sequence) == (new.length, 6)


# The CLI -----------------------------------------------------------------------------------


def _cli(tmp_path: Path, *args: str, **env: str) -> tuple[int, str, str]:
    variables: dict[str, str | None] = {
        "MESSAGEVAULT_STORAGE": f"file:{tmp_path}",
        "MESSAGEVAULT_CONFIG": str(tmp_path / "no-config.toml"),
        "MESSAGEVAULT_URL": None,
        "MESSAGEVAULT_PROFILE": None,
        "MESSAGEVAULT_USER": None,
        "MESSAGEVAULT_PASSWORD": None,
        **env,
    }
    result = CliRunner().invoke(main, list(args), env=variables)
    return result.exit_code, result.stdout, result.stderr


def _one_line(err: str) -> str:
    assert err.startswith("error: "), err
    assert err.count("\n") == 1, err
    return err


def test_cli_shows_sets_and_clears_a_policy_in_storage(tmp_path: Path) -> None:
    with Writer.open(FileStorage(tmp_path), "orders") as writer:
        writer.append([(b"", b"a")])
    code, out, err = _cli(tmp_path, "retention", "orders")
    assert (code, err) == (0, "")
    assert json.loads(out) == {
        "stream": "orders",
        "max_age": None,
        "max_bytes": None,
        "source": "none",
    }
    code, out, _ = _cli(tmp_path, "retention", "orders", "--max-age", "7d")
    assert code == 0
    assert json.loads(out)["max_age"] == 7 * 86400
    code, out, _ = _cli(tmp_path, "retention", "orders", "--max-bytes", "10GiB")
    assert code == 0  # the age limit stays
    assert (json.loads(out)["max_age"], json.loads(out)["max_bytes"]) == (7 * 86400, 10 * 1024**3)
    code, out, _ = _cli(tmp_path, "retention", "orders", "--max-age", "none")
    assert code == 0
    assert load_policy(FileStorage(tmp_path), "orders") == RetentionPolicy(max_bytes=10 * 1024**3)
    code, out, _ = _cli(tmp_path, "retention", "orders", "--clear")
    assert code == 0
    assert json.loads(out)["source"] == "none"
    assert load_policy(FileStorage(tmp_path), "orders") is None


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--max-age", "7x"], 2, "not a duration"),
        (["--max-age", "-1d"], 2, "not a duration"),
        (["--max-bytes", "lots"], 2, "not a size"),
        (["--max-bytes", "0"], 2, "not a size"),
        (["--clear", "--max-age", "1d"], 2, "give it alone"),
        (["--max-bytes", "none"], 2, "needs max_age or max_bytes"),
    ],
)
def test_cli_retention_bad_inputs_change_nothing(
    tmp_path: Path, args: list[str], code: int, words: str
) -> None:
    with Writer.open(FileStorage(tmp_path), "orders") as writer:
        writer.append([(b"", b"a")])
    save_policy(FileStorage(tmp_path), "orders", RetentionPolicy(max_bytes=4096))
    exit_code, _, err = _cli(tmp_path, "retention", "orders", *args)
    assert exit_code == code
    assert words in _one_line(err)
    assert load_policy(FileStorage(tmp_path), "orders") == RetentionPolicy(max_bytes=4096)


def test_cli_retention_of_no_stream(tmp_path: Path) -> None:
    with Writer.open(FileStorage(tmp_path), "orders") as writer:
        writer.append([(b"", b"a")])
    code, _, err = _cli(tmp_path, "retention", "nothing", "--max-age", "1d")
    assert code == 1
    assert "nothing" in _one_line(err)
    assert load_policy(FileStorage(tmp_path), "nothing") is None


def test_cli_retention_through_a_server(tmp_path: Path) -> None:
    storage = with_users(MemoryStorage())
    default = RetentionSettings(default=RetentionPolicy(max_age=86400.0))
    app = create_app(
        StreamHub(storage),
        authenticator=Authenticator(storage, reload_interval=0),
        retention=default,
    )
    with ServedApp(app) as server:
        with Writer.open(storage, "orders") as writer:
            writer.append([(b"", b"a")])
        root = {"MESSAGEVAULT_USER": "root", "MESSAGEVAULT_PASSWORD": "root-secret"}
        code, out, err = _cli(tmp_path, "retention", "orders", "--url", server.url, **root)
        assert (code, err) == (0, "")
        assert json.loads(out)["source"] == "default"
        code, out, err = _cli(
            tmp_path, "retention", "orders", "--max-bytes", "1MiB", "--url", server.url, **root
        )
        assert code == 0, err
        assert json.loads(out) == {
            "stream": "orders",
            "max_age": None,  # the default's age is not copied into the stream's own policy
            "max_bytes": 1024**2,
            "source": "stream",
        }
        reader = {"MESSAGEVAULT_USER": "reader", "MESSAGEVAULT_PASSWORD": "reader-secret"}
        code, out, _ = _cli(tmp_path, "retention", "orders", "--url", server.url, **reader)
        assert (code, json.loads(out)["max_bytes"]) == (0, 1024**2)
        code, _, err = _cli(
            tmp_path, "retention", "orders", "--clear", "--url", server.url, **reader
        )
        assert code == 1
        assert "users grant reader admin" in _one_line(err)
    assert load_policy(storage, "orders") == RetentionPolicy(max_bytes=1024**2)


def test_serve_refuses_bad_retention_options(tmp_path: Path) -> None:
    for args, words in (
        (["--retention-max-age", "soon"], "--retention-max-age"),
        (["--retention-max-bytes", "big"], "--retention-max-bytes"),
        (["--retention-interval", "0"], "--retention-interval"),
    ):
        code, _, err = _cli(tmp_path, "serve", "--port", "0", *args)
        assert code == 2
        assert words in _one_line(err)


async def test_the_async_client_manages_policies_and_deletes(aiohttp_client: MakeClient) -> None:
    storage = with_users(MemoryStorage())
    client = await _client(aiohttp_client, storage)
    await publish(client, "orders", ["a"])
    url = str(client.make_url("")).rstrip("/")
    async with AsyncClient(url, user="root", password="root-secret") as admin:
        shown = await admin.set_retention("orders", max_age=60.0)
        assert (shown["max_age"], shown["source"]) == (60.0, "stream")
        assert (await admin.retention("orders"))["max_age"] == 60.0
        await admin.clear_retention("orders")
        assert (await admin.retention("orders"))["source"] == "none"
        with pytest.raises(InvalidInput, match="max_bytes must be"):
            await admin.set_retention("orders", max_bytes=-1)
        await admin.delete_stream("orders")
        with pytest.raises(StreamNotFound):
            await admin.delete_stream("orders")
    async with AsyncClient(url, user="reader", password="reader-secret") as reader:
        with pytest.raises(Forbidden):
            await reader.delete_stream("orders")


def test_cli_retention_reads_as_a_sentence_on_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Writer.open(FileStorage(tmp_path), "orders") as writer:
        writer.append([(b"", b"a")])
    monkeypatch.setattr(cli_output, "stdout_is_terminal", lambda: True)
    code, out, _ = _cli(tmp_path, "retention", "orders")
    assert (code, out) == (0, "orders: kept for ever (no retention policy)\n")
    code, out, _ = _cli(tmp_path, "retention", "orders", "--max-age", "90d", "--max-bytes", "1GiB")
    assert (code, out) == (0, "orders: max age 90d, max bytes 1GiB (its own policy)\n")


@pytest.mark.parametrize(
    ("option", "value"), [("--max-bytes", "12XB"), ("--max-age", "soon"), ("--max-age", "-1d")]
)
def test_cli_refuses_a_bad_limit_before_asking_anyone(
    tmp_path: Path, option: str, value: str
) -> None:
    """A mistyped limit is the error, not the server it would have gone to being down."""
    code, _, err = _cli(
        tmp_path, "retention", "orders", option, value, "--url", "http://127.0.0.1:1"
    )
    assert code == 2 and option in _one_line(err) and "cannot reach" not in err
