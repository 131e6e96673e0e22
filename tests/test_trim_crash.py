"""A trim cut short by a crash between its checkpoint commit and its release.

A child process (``trim_crash_writer.py``) appends, then trims, and is
killed (SIGKILL) once the trim's checkpoint is committed and before the
storage below it is released. Readers must already refuse those bytes; the
next writer to open the stream must release them; nothing acknowledged at
or after the new first position may be lost.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from messagevault import FileStorage, Reader, Writer
from messagevault.errors import PositionTrimmed
from messagevault.storage.base import Storage
from tests import trim_crash_writer
from tests.azurite import Azurite

CHILD = Path(__file__).with_name("trim_crash_writer.py")
STREAM = trim_crash_writer.STREAM
WAIT = 60.0  # seconds for the child to reach the trim


def _run_until_committed(url: str) -> tuple[list[tuple[int, int, int]], int]:
    """The child's acknowledged batches and the first position its trim committed."""
    acks: list[tuple[int, int, int]] = []
    with subprocess.Popen(
        [sys.executable, str(CHILD), url], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None
        deadline = time.monotonic() + WAIT
        try:
            for raw in proc.stdout:
                word, *numbers = raw.decode().split()
                if word == "ACK":
                    frame, sequence, count = map(int, numbers)
                    acks.append((frame, sequence, count))
                elif word == "COMMITTED":
                    return acks, int(numbers[0])
                assert time.monotonic() < deadline, "the child took too long"
            raise AssertionError(f"the child ended early: {proc.stderr.read()!r}")  # type: ignore[union-attr]
        finally:
            if proc.poll() is None:  # never signal a pid already reaped
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _check_after_crash(storage: Storage, acks: list[tuple[int, int, int]], first: int) -> None:
    kept = [(frame, sequence, count) for frame, sequence, count in acks if frame >= first]
    assert kept and kept[0][0] == first
    assert len(kept) == trim_crash_writer.BATCHES - trim_crash_writer.CUT
    store = storage.open_stream(STREAM)
    assert store.read(0, 64) != bytes(64)  # the crash left them stored...
    with Reader.open(storage, STREAM) as reader:
        assert reader.checkpoint().first_position == first
        with pytest.raises(PositionTrimmed) as info:  # ...but unreadable
            reader.read(acks[1][0])
        assert info.value.first_position == first
        messages = list(reader.read())
    expected = [
        (sequence + index, trim_crash_writer.value(batch, index))
        for batch, (_, sequence, count) in enumerate(acks)
        if acks[batch][0] >= first
        for index in range(count)
    ]
    assert [(m.sequence, m.value) for m in messages] == expected

    # (Azure: the dead child still holds its lease; a new writer takes the stream over.)
    with Writer.open(storage, STREAM, takeover=True) as writer:  # finishes the release
        assert writer.checkpoint.first_position == first
        appended = writer.append([(b"k", b"after the crash")])
        assert appended[0].sequence == acks[-1][1] + acks[-1][2]
    page = storage.open_stream(STREAM).page_size
    released = first // page * page if page > 1 else first
    assert store.read(0, released) == bytes(released)
    with Reader.open(storage, STREAM) as reader:
        assert [m.sequence for m in reader.read()] == [s for s, _ in expected] + [
            appended[0].sequence
        ]
    store.close()


def test_a_trim_killed_before_its_release_is_finished_by_the_next_writer(tmp_path: Path) -> None:
    acks, first = _run_until_committed(f"file:{tmp_path}")
    data = tmp_path / STREAM / "data"
    held = data.stat().st_blocks
    _check_after_crash(FileStorage(tmp_path), acks, first)
    freed = (held - data.stat().st_blocks) * 512
    if freed == 0:
        pytest.skip("this filesystem cannot punch holes (the rest was checked)")
    assert freed >= first - 2 * 4096  # all but the partial blocks at the edges


def test_a_trim_killed_before_its_release_on_azure(
    azurite: Azurite, azure_storage: Storage
) -> None:
    acks, first = _run_until_committed("azure:" + azurite.connection_string)
    _check_after_crash(azure_storage, acks, first)


def test_a_trim_holds_across_a_server_restart(tmp_path: Path) -> None:
    from messagevault.client import Client
    from tests.serve_process import serve_process

    root = tmp_path / "data"
    with (
        serve_process(root, "admin", "secret", fsync="always") as url,
        Client(url, user="admin", password="secret") as client,
    ):
        results = [client.publish(STREAM, [("k", f"v{n}")] * 2) for n in range(10)]
        trimmed = client.trim(STREAM, before_sequence=9)  # batch 4 holds 8 and 9
        assert (trimmed.first_position, trimmed.first_sequence) == (results[4].frame_position, 8)
    with (
        serve_process(root, "admin", "secret", fsync="always") as url,
        Client(url, user="admin", password="secret") as client,
    ):
        info = client.info(STREAM)
        assert (info.first_position, info.first_sequence) == (trimmed.first_position, 8)
        assert [m.sequence for m in client.read(STREAM)] == list(range(8, 20))
        with pytest.raises(PositionTrimmed) as error:
            list(client.read(STREAM, results[1].frame_position))
        assert error.value.first_position == trimmed.first_position
        appended = client.publish(STREAM, [("k", "after the restart")])
        assert appended[0].sequence == 20
        assert client.trim(STREAM, before_position=0).trimmed is False


def test_a_power_cut_after_a_trim_leaves_no_hole_under_an_older_checkpoint(
    tmp_path: Path,
) -> None:
    from messagevault.storage.power_loss import PowerLossStorage

    for seed in range(6):
        root = tmp_path / f"seed-{seed}"
        with PowerLossStorage(FileStorage(root, fsync="always"), seed=seed) as power:
            writer = Writer.open(power, STREAM)
            results = [writer.append([(b"k", bytes([n]) * 20_000)]) for n in range(8)]
            trimmed = writer.trim(results[5].frame_position)
            power.power_cut()
            with Reader.open(power, STREAM) as reader:
                checkpoint = reader.checkpoint()
                # The trim survives: its checkpoint was flushed before the hole was
                # punched (a lost one would leave first_position 0 over a hole).
                assert checkpoint.first_position == trimmed.first_position, seed
                assert [m.value[0] for m in reader.read()] == [5, 6, 7], seed
